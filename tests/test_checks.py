"""``fastprompt._checks``: the one check of class names (every source of them goes through it),
the one way untrusted text is shown on a terminal (issue 23, items 3 and 4), and that every use
of a seed takes the one range that check_seed allows (item 9): 0 <= seed < 2**32."""
from __future__ import annotations

import unicodedata

import pytest

from fastprompt._checks import SEED_LIMIT, check_class_name, check_class_names, check_seed, printable
from fastprompt.data import add_label_noise, few_shot_subset
from fastprompt.data.cache import CacheSpec
from fastprompt.data.source import DataSource
from fastprompt.train import TrainConfig
from fastprompt.train.epoch import epoch_order

OUTSIDE = [-1, SEED_LIMIT, 10**23]


@pytest.mark.parametrize("name, shown", [
    ("cat\u202egnp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
    ("a\tb", "U+0009"), ("nul\x00", "U+0000"), ("esc\x1b[2J", "U+001B"),
    ("two\nlines", "a line break"), ("two\u2028lines", "U+2028 LINE SEPARATOR, a line break"),
    ("bom\ufeffinside", "U+FEFF"), ("private\ue000", "U+E000"), ("unassigned\U000e0fff", "U+E0FFF"),
    ("surrogate\udcff", "U+DCFF"),
])
def test_category_c_characters_are_refused_by_name(name, shown):
    with pytest.raises(ValueError, match=r"^--classnames: f\.txt: line 3 .* contains the control "
                                         r"character\(s\) .*; rename it$") as e:
        check_class_name(name, "--classnames: f.txt", "line 3")
    assert shown in str(e.value)


def test_names_are_nfc_stripped_without_a_bom():
    nfd = unicodedata.normalize("NFD", "crème brûlée")
    assert check_class_name(f"\ufeff  {nfd} ", "w") == "crème brûlée"
    assert check_class_name("猫 and ñ", "w") == "猫 and ñ"
    for empty in ("", "   ", "\ufeff"):
        with pytest.raises(ValueError, match="^w: class name .* is empty"):
            check_class_name(empty, "w")
    with pytest.raises(TypeError, match="^w: class name 3 is not a string"):
        check_class_name(3, "w")
    long = check_class_name("x" * 5000, "w")
    assert long == "x" * 5000
    with pytest.raises(ValueError) as e:
        check_class_name("x" * 5000 + "\x1b", "w")
    assert len(str(e.value)) < 300 and "5001 characters" in str(e.value)


def test_lists_are_checked_entry_by_entry_and_distinct_after_nfc():
    assert check_class_names(["a", " b "], "w") == ["a", "b"]
    with pytest.raises(ValueError, match=r"^w: entry 2 'b\\x1b' contains"):
        check_class_names(["a", "b\x1b"], "w")
    with pytest.raises(ValueError, match=r"^w: \['café'\] appear more than once"):
        check_class_names(["caf\u00e9", "cafe\u0301"], "w")
    with pytest.raises(TypeError, match="^w: expected a list"):
        check_class_names("ab", "w")


def test_printable_escapes_what_would_act_on_a_terminal():
    assert printable("plain text, ünïcode 猫 and spaces") == "plain text, ünïcode 猫 and spaces"
    assert printable("x\x1b[2J\ny\r\u202ez\udcff\u200b\t") == \
        "x\\x1b[2J\\ny\\r\\u202ez\\udcff\\u200b\\t"
    assert printable("a\x1b").isprintable()



def test_check_seed_takes_exactly_the_documented_range():
    assert SEED_LIMIT == 2**32
    assert check_seed(0) == 0 and check_seed(SEED_LIMIT - 1) == SEED_LIMIT - 1
    for seed in OUTSIDE:
        with pytest.raises(ValueError, match=r"^seeds\[3\]: expected an int in \[0, 2\*\*32\)"):
            check_seed(seed, "seeds[3]")
    for seed in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=r"^seed: expected an int in \[0, 2\*\*32\)"):
            check_seed(seed)


@pytest.mark.parametrize("seed", OUTSIDE)
def test_every_library_use_of_a_seed_refuses_one_outside_the_range(seed, cached_shapes):
    shared = cached_shapes()
    with pytest.raises(ValueError, match="^seed: expected an int in"):
        TrainConfig(seed=seed)
    with pytest.raises(ValueError, match="^seed: expected an int in"):
        CacheSpec(shared.model, "fastprompt-tiny", shared.preprocess_train,
                  shared.preprocess_val, shared.splits, seed=seed)
    with pytest.raises(ValueError, match="^seed: expected an int in"):
        few_shot_subset(shared.splits.train, 1, seed=seed)
    with pytest.raises(ValueError, match="^seed: expected an int in"):
        add_label_noise([0, 1], 2, 0.5, seed=seed)
    with pytest.raises(ValueError, match="^seed: expected an int in"):
        DataSource.create(shared.root, seed=seed)


def test_the_largest_seed_works_everywhere_it_is_used(cached_shapes):
    """The training streams seed ``seed * 2_000_003 + epoch``: within int64 for every seed of
    the range and any epoch count a run can have."""
    shared = cached_shapes()
    config = TrainConfig(seed=SEED_LIMIT - 1, epochs=10**6)
    for epoch in (0, config.epochs - 1):
        sample, row = epoch_order(config, shared.cache, epoch)
        assert sorted(sample.tolist()) == list(range(shared.cache.num_train_images))
    CacheSpec(shared.model, "fastprompt-tiny", shared.preprocess_train, shared.preprocess_val,
              shared.splits, seed=SEED_LIMIT - 1, shots=1, noise_rate=0.5)
