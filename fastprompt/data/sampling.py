"""Few-shot subsets and synthetic label noise, both seeded and deterministic.

Both use Python's ``random.Random`` seeded with a string (``"fastprompt.few_shot:<seed>"``,
``"fastprompt.noise:<seed>"``), which is stable across platforms and Python versions, and keeps
the two draws independent for the same seed.
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


def add_label_noise(labels: Sequence[int], num_classes: int, rate: float,
                    noise_type: str = "symmetric", *, seed: int = 1) -> list[int]:
    """Noisy copies of ``labels`` for robustness studies (the input is not changed).

    Each label is corrupted independently with probability ``rate``:

    * ``symmetric``: replaced by a class drawn uniformly from the ``num_classes - 1`` *other*
      classes, so a corrupted label is always wrong;
    * ``pairflip``: replaced by ``(y + 1) mod num_classes``.

    The realised noise fraction is therefore ``rate`` only in expectation.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes: label noise needs at least 2 classes, got {num_classes}")
    check_noise_rate(rate, "rate")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type: must be one of {NOISE_TYPES}, got {noise_type!r}")
    check_seed(seed)
    labels = list(labels)
    bad = [y for y in labels if isinstance(y, bool) or not isinstance(y, int)
           or not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"labels: values must be ints in [0, {num_classes}), got {bad[0]!r}")
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
