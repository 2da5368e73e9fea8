"""Few-shot subsets and synthetic label noise, all seeded and deterministic.

Label noise comes in two protocols: a global rate (``add_label_noise``: each label corrupted
independently, DSPT's) and exact counts per class (``add_label_noise_per_class``: K wrong labels
in every class and every label K times on other classes' images, PTNL's and JoAPR's).

Each draw uses Python's ``random.Random`` seeded with a string of its own
(``"fastprompt.few_shot:<seed>"``, ``"fastprompt.noise:<seed>"``,
``"fastprompt.noise_per_class:<seed>"``), which is stable across platforms and Python versions,
and keeps the draws independent for the same seed.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from fastprompt._checks import check_int, check_seed
from fastprompt.data.folders import Sample

NOISE_TYPES = ("symmetric", "pairflip")


def check_noise_rate(rate, name: str = "noise_rate") -> float:
    """``rate`` as a float in [0, 1] (1: every label corrupted): the one range of a label-noise
    rate, for the library, a sweep spec and ``--noise-rate``. TypeError or ValueError naming
    ``name``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(rate).__name__} "
                        f"{rate!r:.40}")
    if not 0.0 <= rate <= 1.0:  # NaN too
        raise ValueError(f"{name}: must lie in [0, 1], got {rate}")
    return float(rate)


def few_shot_subset(samples: Sequence[Sample], shots: int, *, seed: int = 1,
                    classnames: Sequence[str] | None = None) -> list[Sample]:
    """``shots`` samples per class, drawn without replacement from ``seed``.

    The result keeps the input order (so it is grouped however the input was). Raises
    ``ValueError`` if a class has fewer than ``shots`` samples; ``classnames`` (indexed by label)
    only makes that message name the class.
    """
    check_int("shots", shots, 1)
    check_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(f"fastprompt.few_shot:{seed}")
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < shots:
            name = (f"{classnames[label]!r} (label {label})" if classnames is not None
                    and 0 <= label < len(classnames) else f"label {label}")
            raise ValueError(f"shots: {shots} per class requested, but class {name} has only "
                             f"{len(members)} sample(s)")
        chosen.extend(rng.sample(members, shots))
    return [tuple(samples[i]) for i in sorted(chosen)]


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes: label noise needs at least 2 classes, got {num_classes}")


def _checked_labels(labels: Sequence[int], num_classes: int) -> list[int]:
    """``labels`` as a list, each an int in [0, ``num_classes``)."""
    labels = list(labels)
    bad = [y for y in labels if isinstance(y, bool) or not isinstance(y, int)
           or not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"labels: values must be ints in [0, {num_classes}), got {bad[0]!r}")
    return labels


def add_label_noise(labels: Sequence[int], num_classes: int, rate: float,
                    noise_type: str = "symmetric", *, seed: int = 1) -> list[int]:
    """Noisy copies of ``labels`` for robustness studies (the input is not changed).

    Each label is corrupted independently with probability ``rate``:

    * ``symmetric``: replaced by a class drawn uniformly from the ``num_classes - 1`` *other*
      classes, so a corrupted label is always wrong;
    * ``pairflip``: replaced by ``(y + 1) mod num_classes``.

    The realised noise fraction is therefore ``rate`` only in expectation.
    """
    _check_num_classes(num_classes)
    check_noise_rate(rate, "rate")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type: must be one of {NOISE_TYPES}, got {noise_type!r}")
    check_seed(seed)
    labels = _checked_labels(labels, num_classes)
    rng = random.Random(f"fastprompt.noise:{seed}")
    noisy = []
    for y in labels:
        # One draw per label whatever the outcome, so the noise pattern does not depend on the
        # labels' values.
        flip = rng.random() < rate
        other = rng.randrange(num_classes - 1)
        if not flip:
            noisy.append(y)
        elif noise_type == "symmetric":
            noisy.append(other + (other >= y))
        else:
            noisy.append((y + 1) % num_classes)
    return noisy


def add_label_noise_per_class(labels: Sequence[int], num_classes: int, per_class: int,
                              noise_type: str = "symmetric", *, seed: int = 1,
                              classnames: Sequence[str] | None = None) -> list[int]:
    """Noisy copies of ``labels`` with exact counts (the input is not changed): ``per_class``
    (K) images of every class carry another class's label, and every label is carried by
    exactly K images of other classes, as PTNL (ICCV'23) and JoAPR (CVPR'24) build their noisy
    few-shot sets (a class's 16 shots hold K images of other classes).

    For each class, in label order, K of its images are drawn (positions in ``labels``, without
    replacement); then for each slot j < K a derangement σ_j of the classes (a permutation
    without fixed points) sends the j-th drawn image of class c to label σ_j(c):

    * ``symmetric``: σ_j uniform over all derangements, drawn anew per slot (by rejection:
      shuffles until one has no fixed point);
    * ``pairflip``: σ(c) = (c + 1) mod ``num_classes`` for every slot.

    Each σ_j is a permutation, so every class gives and receives one label per slot: exactly K
    each. Every class needs at least K images (K equal to a class's size corrupts all of it, as
    rate 1 does); ``ValueError`` naming ``per_class`` and the class otherwise (``classnames``,
    indexed by label, only makes that message name it). K = 0 returns the labels unchanged.
    """
    _check_num_classes(num_classes)
    check_int("per_class", per_class, 0)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type: must be one of {NOISE_TYPES}, got {noise_type!r}")
    check_seed(seed)
    labels = _checked_labels(labels, num_classes)
    if per_class == 0:
        return labels
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    for label, members in enumerate(by_class):
        if len(members) < per_class:
            name = (f"{classnames[label]!r} (label {label})" if classnames is not None
                    and 0 <= label < len(classnames) else f"label {label}")
            raise ValueError(f"per_class: {per_class} noisy labels per class requested, but "
                             f"class {name} has only {len(members)} image(s)")
    rng = random.Random(f"fastprompt.noise_per_class:{seed}")
    picked = [rng.sample(members, per_class) for members in by_class]
    noisy = list(labels)
    for j in range(per_class):
        sigma = (_derangement(num_classes, rng) if noise_type == "symmetric"
                 else [(c + 1) % num_classes for c in range(num_classes)])
        for c in range(num_classes):
            noisy[picked[c][j]] = sigma[c]
    return noisy


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of ``range(n)`` without fixed points, uniform over all of them: uniform
    shuffles are drawn until one has none (on average e ≈ 2.7 shuffles for any n >= 2)."""
    while True:
        sigma = list(range(n))
        rng.shuffle(sigma)
        if all(s != c for c, s in enumerate(sigma)):
            return sigma
