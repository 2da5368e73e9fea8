"""The shared checks of fastprompt._checks, and that every use of a seed takes the one range that
check_seed allows (issue 23, item 9): 0 <= seed < 2**32."""
from __future__ import annotations

import pytest

from fastprompt._checks import SEED_LIMIT, check_seed
from fastprompt.data import add_label_noise, few_shot_subset
from fastprompt.data.cache import CacheSpec
from fastprompt.data.source import DataSource
from fastprompt.train import TrainConfig
from fastprompt.train.epoch import epoch_order

OUTSIDE = [-1, SEED_LIMIT, 10**23]


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
