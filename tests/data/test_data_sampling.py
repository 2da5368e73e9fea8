"""Few-shot subsets and label noise: exact counts, determinism, and the noise distributions."""
import math
import random

import pytest

from fastprompt.data import add_label_noise, few_shot_subset


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
