"""A data set as a run records it (``DataSource``: its folder, split, seed and class half), and
base and new classes as CoOp/CoCoOp's base-to-new protocol splits a data set.

The labels are sorted; the first ``ceil(C/2)`` classes are the *base* classes, the remaining
``floor(C/2)`` the *new* ones, and each half is relabelled from 0 in the same order (Dassl's
``subsample_classes``, which CoOp's data sets call). Every split (train, val, test) keeps only
the images of the chosen half.

Few-shot draws do not depend on the half: with ``shots`` the training split is first reduced
to ``shots`` images per class over *all* classes (as Dassl draws its few-shot set before it
subsamples), and the half is taken from that draw. See docs/protocols.md for where fastprompt
differs from Dassl.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from fastprompt._checks import check_seed
from fastprompt.data.folders import DEFAULT_TEST_FRACTION, DatasetSplits, Sample, load_dataset
from fastprompt.data.sampling import few_shot_subset

SUBSAMPLES = ("all", "base", "new")


def base_new_classes(num_classes: int) -> tuple[range, range]:
    """``(base labels, new labels)`` of ``num_classes`` sorted labels: the first ``ceil(C/2)``
    and the rest."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: base and new halves need at least 2 classes, got "
                         f"{num_classes!r}")
    m = math.ceil(num_classes / 2)
    return range(m), range(m, num_classes)


def subsample_classes(splits: DatasetSplits, subsample: str, *, shots: int | None = None,
                      seed: int = 1) -> DatasetSplits:
    """The ``subsample`` half of ``splits`` (``"all"``: every class, unchanged), relabelled from 0.

    ``shots``/``seed``: the few-shot draw the training split will get (as for the feature
    cache); it is made over all classes first, so a class keeps the same training images whether
    it is trained on in the base half or with every class. Passing the result to the cache with
    the same ``shots`` then keeps all of them (a draw of ``shots`` out of ``shots``).
    """
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"splits: expected a DatasetSplits, got {type(splits).__name__}")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample: must be one of {SUBSAMPLES}, got {subsample!r}")
    if subsample == "all":
        return splits
    base, new = base_new_classes(splits.num_classes)
    kept = list(base if subsample == "base" else new)
    relabel = {old: new_label for new_label, old in enumerate(kept)}
    train = splits.train
    if shots is not None:
        train = few_shot_subset(train, shots, seed=seed, classnames=splits.classnames)

    def keep(samples: list[Sample]) -> list[Sample]:
        return [(path, relabel[label]) for path, label in samples if label in relabel]

    return DatasetSplits([splits.classnames[i] for i in kept], keep(train), keep(splits.test),
                         keep(splits.val), splits.root, list(splits.skipped))


@dataclass(frozen=True)
class DataSource:
    """Where a data set's images are and how they are split: the image folder (absolute), the
    CoOp split file (absolute, or None), the test share and seed of a folder without a split,
    and the class half. ``to_dict`` is what a run records in its metrics.json (``"data"``)."""
    root: str
    split_file: str | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 1
    subsample: str = "all"

    @classmethod
    def create(cls, root, *, split_file=None, test_fraction: float = DEFAULT_TEST_FRACTION,
               seed: int = 1, subsample: str = "all") -> "DataSource":
        """Paths made absolute (``split_file`` relative to ``root``, as ``load_dataset`` reads it);
        the test share and seed checked as ``load_dataset`` checks them, the folders not read."""
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root: expected a path, got {type(root).__name__}")
        root = os.path.abspath(os.fspath(root))
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
            raise TypeError(f"test_fraction: expected a number in [0, 1), got "
                            f"{type(test_fraction).__name__} {test_fraction!r:.40}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction: must lie in [0, 1), got {test_fraction}")
        check_seed(seed)
        if split_file is not None:
            if not isinstance(split_file, (str, os.PathLike)):
                raise TypeError(f"split_file: expected a path, got {type(split_file).__name__}")
            split_file = os.path.join(root, os.fspath(split_file))
        if subsample not in SUBSAMPLES:
            raise ValueError(f"subsample: must be one of {SUBSAMPLES}, got {subsample!r}")
        return cls(root, split_file, float(test_fraction), seed, subsample)

    def load(self, shots: int | None = None, *, for_testing: bool = False) -> DatasetSplits:
        """The splits of this source (its class half), with the few-shot draw of ``shots`` per
        class at ``seed`` made before the half is taken (see ``subsample_classes``).
        ``for_testing``: read to be evaluated on (``load_dataset``)."""
        splits = load_dataset(self.root, split_file=self.split_file,
                              test_fraction=self.test_fraction, seed=self.seed,
                              for_testing=for_testing)
        return subsample_classes(splits, self.subsample, shots=shots, seed=self.seed)

    def with_subsample(self, subsample: str) -> "DataSource":
        return DataSource.create(self.root, split_file=self.split_file,
                                 test_fraction=self.test_fraction, seed=self.seed,
                                 subsample=subsample)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "data") -> "DataSource":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or "root" not in d or set(d) - names:
            raise ValueError(f"{where}: expected an object with 'root' and optionally "
                             f"{sorted(names - {'root'})}, got {d!r:.200}")
        return cls.create(d["root"], split_file=d.get("split_file"),
                          test_fraction=d.get("test_fraction", DEFAULT_TEST_FRACTION),
                          seed=d.get("seed", 1), subsample=d.get("subsample", "all"))
