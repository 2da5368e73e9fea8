"""Few-shot subsets and label noise: exact counts, determinism, and the noise distributions."""
import collections
import itertools
import math
import random

import pytest

from fastprompt.data import add_label_noise, add_label_noise_per_class, few_shot_subset


def _samples(counts):
    return [(f"/img/{label}_{k}.png", label) for label, n in enumerate(counts) for k in range(n)]


def test_few_shot_exact_counts_subset_and_order(seed):
    samples = _samples([9, 4, 13, 5])
    random.Random(seed).shuffle(samples)
    sub = few_shot_subset(samples, 4, seed=seed)
    assert [sum(1 for _, y in sub if y == c) for c in range(4)] == [4, 4, 4, 4]
    positions = [samples.index(s) for s in sub]
    assert positions == sorted(positions) and len(set(positions)) == 16  # input order, no repeats
    assert few_shot_subset(samples, 4, seed=seed) == sub
    draws = {tuple(few_shot_subset(samples, 4, seed=seed + k)) for k in range(1, 6)}
    assert len(draws) > 1, f"seed={seed}"


def test_few_shot_too_many_shots_names_the_class():
    samples = _samples([5, 2])
    with pytest.raises(ValueError,
                       match=r"^shots: 3 per class .* class 'owl' \(label 1\) has only 2"):
        few_shot_subset(samples, 3, classnames=["cat", "owl"])
    with pytest.raises(ValueError, match="^shots: expected an int >= 1"):
        few_shot_subset(samples, 0)
    with pytest.raises(TypeError, match="^shots"):
        few_shot_subset(samples, 2.0)


def _binomial_ok(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_symmetric_noise_is_uniform_over_other_classes(seed):
    c, n, rate = 5, 20000, 0.3
    rng = random.Random(seed)
    labels = [rng.randrange(c) for _ in range(n)]
    noisy = add_label_noise(labels, c, rate, "symmetric", seed=seed)
    changed = [(y, z) for y, z in zip(labels, noisy) if y != z]
    assert _binomial_ok(len(changed), n, rate), f"seed={seed}"
    # Every corruption lands on another class, each with probability 1/(C-1).
    for y in range(c):
        targets = [z for yy, z in changed if yy == y]
        for z in range(c):
            hits = sum(1 for t in targets if t == z)
            if z == y:
                assert hits == 0
            else:
                assert _binomial_ok(hits, len(targets), 1 / (c - 1)), f"seed={seed}"
    assert add_label_noise(labels, c, rate, "symmetric", seed=seed) == noisy


def test_pairflip_noise_flips_to_the_next_class(seed):
    c, n, rate = 7, 10000, 0.45
    labels = [i % c for i in range(n)]
    noisy = add_label_noise(labels, c, rate, "pairflip", seed=seed)
    changed = [(y, z) for y, z in zip(labels, noisy) if y != z]
    assert all(z == (y + 1) % c for y, z in changed)
    assert _binomial_ok(len(changed), n, rate), f"seed={seed}"


def test_noise_extremes_and_input_untouched():
    labels = [0, 1, 2, 2, 1]
    copy = list(labels)
    assert add_label_noise(labels, 3, 0.0, seed=4) == labels
    assert add_label_noise(labels, 3, 1.0, "pairflip", seed=4) == [1, 2, 0, 0, 2]
    assert all(z != y for y, z in zip(labels, add_label_noise(labels, 3, 1.0, seed=4)))
    assert labels == copy


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(num_classes=1), ValueError, "^num_classes: label noise needs at least 2"),
    (dict(rate=1.5), ValueError, r"^rate: must lie in \[0, 1\]"),
    (dict(noise_type="asym"), ValueError, "^noise_type: must be one of"),
    (dict(labels=[0, 3]), ValueError, r"^labels: values must be ints in \[0, 3\)"),
    (dict(seed="1"), TypeError, "^seed"),
])
def test_noise_bad_arguments(kwargs, exc, message):
    args = dict(labels=[0, 1, 2], num_classes=3, rate=0.2, noise_type="symmetric", seed=1)
    args.update(kwargs)
    labels, c, rate, kind, seed = (args[k] for k in ("labels", "num_classes", "rate",
                                                     "noise_type", "seed"))
    with pytest.raises(exc, match=message):
        add_label_noise(labels, c, rate, kind, seed=seed)


# ----- per-class label noise (PTNL's, JoAPR's protocol) --------------------------------------


@pytest.mark.parametrize("noise_type", ["symmetric", "pairflip"])
@pytest.mark.parametrize("counts, per_class", [([4, 4, 4], 1), ([16] * 5, 4), ([16] * 7, 8),
                                               ([3, 9, 5, 4, 12], 3), ([2, 2, 2], 2)])
def test_per_class_noise_exact_counts(seed, noise_type, counts, per_class):
    """Every class loses exactly K labels and receives exactly K (odd class counts, unequal
    class sizes, K equal to a class's size); no picked image keeps its label."""
    c = len(counts)
    labels = [y for y, n in enumerate(counts) for _ in range(n)]
    random.Random(seed).shuffle(labels)
    copy = list(labels)
    noisy = add_label_noise_per_class(labels, c, per_class, noise_type, seed=seed)
    assert labels == copy
    changed = [(y, z) for y, z in zip(labels, noisy) if y != z]
    assert len(changed) == c * per_class, f"seed={seed}"  # no picked image keeps its label
    assert collections.Counter(y for y, _ in changed) == {y: per_class for y in range(c)}
    assert collections.Counter(z for _, z in changed) == {z: per_class for z in range(c)}
    if noise_type == "pairflip":
        assert all(z == (y + 1) % c for y, z in changed)
    assert add_label_noise_per_class(labels, c, per_class, noise_type, seed=seed) == noisy


def test_symmetric_per_class_noise_draws_uniform_derangements():
    """With one image per class and K = 1 the noisy labels are the slot's derangement: all 9
    of 4 classes come up, equally often."""
    c, n = 4, 1800
    draws = collections.Counter(tuple(add_label_noise_per_class(range(c), c, 1, seed=s))
                                for s in range(n))
    derangements = {p for p in itertools.permutations(range(c))
                    if all(a != b for a, b in enumerate(p))}
    assert set(draws) == derangements
    assert all(_binomial_ok(k, n, 1 / 9) for k in draws.values()), draws


def test_per_class_noise_is_deterministic_and_its_own_draw():
    """The same labels for a seed whatever else was drawn before (Python's global random, the
    other noise, the few-shot draw), on every platform (pinned), and other labels for other
    seeds."""
    labels = [y for y in range(5) for _ in range(4)]
    pinned = add_label_noise_per_class(labels, 5, 2, seed=3)
    random.seed(0)
    random.random()
    add_label_noise(labels, 5, 0.5, seed=3)
    few_shot_subset(_samples([4] * 5), 2, seed=3)
    assert add_label_noise_per_class(labels, 5, 2, seed=3) == pinned
    assert pinned == [0, 2, 0, 3, 4, 0, 1, 1, 2, 1, 1, 2, 0, 3, 4, 3, 4, 2, 3, 4]
    assert add_label_noise_per_class(labels, 5, 2, "pairflip", seed=3) == [
        0, 1, 0, 1, 2, 2, 1, 1, 2, 3, 3, 2, 4, 3, 4, 3, 4, 0, 0, 4]
    others = {tuple(add_label_noise_per_class(labels, 5, 2, seed=s)) for s in range(4, 9)}
    assert len(others - {tuple(pinned)}) == 5


def test_no_per_class_noise_and_a_class_too_small():
    labels = [0, 1, 2, 2, 1, 0]
    assert add_label_noise_per_class(labels, 3, 0, seed=4) == labels
    with pytest.raises(ValueError, match=r"^per_class: 2 noisy labels per class requested, but "
                       r"class 'owl' \(label 1\) has only 1 image\(s\)$"):
        add_label_noise_per_class([0, 0, 1, 2, 2], 3, 2, classnames=["cat", "owl", "emu"])
    with pytest.raises(ValueError, match=r"^per_class: .* class label 3 has only 0 image"):
        add_label_noise_per_class(labels, 4, 1)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(per_class=-1), ValueError, "^per_class: expected an int >= 0, got -1"),
    (dict(per_class=1.0), TypeError, "^per_class: expected an int >= 0"),
    (dict(per_class=True), TypeError, "^per_class: expected an int >= 0"),
    (dict(num_classes=1), ValueError, "^num_classes: label noise needs at least 2"),
    (dict(num_classes=3.0), TypeError, "^num_classes: expected an int"),
    (dict(noise_type="asym"), ValueError, "^noise_type: must be one of"),
    (dict(labels=[0, 1, 2, 3]), ValueError, r"^labels: values must be ints in \[0, 3\)"),
    (dict(seed=-1), ValueError, "^seed"),
])
def test_per_class_noise_bad_arguments(kwargs, exc, message):
    args = dict(labels=[0, 1, 2], num_classes=3, per_class=1, noise_type="symmetric", seed=1)
    args.update(kwargs)
    labels, c, k, kind, seed = (args[key] for key in ("labels", "num_classes", "per_class",
                                                      "noise_type", "seed"))
    with pytest.raises(exc, match=message):
        add_label_noise_per_class(labels, c, k, kind, seed=seed)
