"""Data sets on disk: class-folder trees and CoOp's ``split_zhou_<Name>.json`` files.

Both readers return a :class:`DatasetSplits`: class names, and ``(path, label)`` lists per split
with absolute paths. Nothing is decoded here beyond an optional header check per file.

Unreadable images. Only regular files are images: a FIFO, socket or device named like an image
is never opened (a FIFO would block the reader until a writer comes); it is left out and
recorded in ``DatasetSplits.skipped`` (a split file that lists one is refused). With
``check_images=True`` (the default) every listed file is opened with PIL and ``verify()``-ed (a
header/structure read, not a full decode). A file that fails is left out: it is recorded in
``DatasetSplits.skipped`` and one ``UserWarning`` gives the count. A file
that passes this check but still cannot be decoded later fails the feature cache build with a
``ValueError`` naming it (dropping it there would silently shift the few-shot draw and the sample
indices).

Folder trees. Split folders are recognised whatever their case (``Train``, ``TEST``), with
``val``, ``valid`` or ``validation`` for the validation split; a tree that mixes split folders
with class folders, or has two folders for one split, is refused rather than guessed at.
Symbolic links that point back inside the tree are skipped (a link to ``.`` would otherwise
become a class holding copies of every image); links to elsewhere are followed.

Class names are checked where the data is read, by the one check of every source of class
names (``fastprompt._checks.check_class_name``: no control or format characters such as
newlines or U+202E, a byte-order mark dropped) and normalised to Unicode NFC, so folders copied
from macOS (NFD) name the same classes.
"""
from __future__ import annotations

import glob
import os
import random
import warnings
from dataclasses import dataclass, field

from PIL import Image

from fastprompt._checks import check_class_name, check_seed
from fastprompt._io import IMAGE_EXTENSIONS, open_regular_file, read_json, regular_file_problem

DEFAULT_TEST_FRACTION = 0.2

Sample = tuple[str, int]


@dataclass(frozen=True)
class DatasetSplits:
    """Class names and ``(absolute path, label)`` lists for each split of a data set.

    ``val`` is empty when the source has no validation split. ``skipped`` lists the files left
    out because they could not be read as images.
    """
    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    val: list[Sample] = field(default_factory=list)
    root: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "valid": "val",
                 "validation": "val"}


def classname_from_folder(name: str, where: str = "root") -> str:
    """A class folder's name as a class name: underscores become spaces, checked and normalised
    as every class name is (``check_class_name``: Unicode NFC, no control or format characters,
    not empty); ValueError naming ``where`` otherwise."""
    name = check_class_name(name, where)
    text = name.replace("_", " ").strip()
    if not text:
        raise ValueError(f"{where}: class name {name!r} is empty once underscores are spaces")
    return text


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _inside(path: str, tree: str) -> bool:
    tree = os.path.realpath(tree)
    target = os.path.realpath(path)
    return target == tree or target.startswith(tree + os.sep)


def _loops_back(path: str, tree: str) -> bool:
    """Whether ``path`` is a symbolic link to somewhere inside ``tree`` (skipped: its files are
    in the tree already)."""
    return os.path.islink(path) and _inside(path, tree)


def _list_images(folder: str, tree: str, skipped: list[str] | None = None) -> list[str]:
    """Image files under ``folder`` (recursively, following links that lead out of ``tree``),
    sorted, hidden entries ignored. Entries that are not regular files (FIFOs, sockets,
    devices) are left out, and added to ``skipped`` when given."""
    found = []
    seen = {os.path.realpath(folder)}  # a link cycle outside the tree is walked once
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            path = os.path.join(dirpath, d)
            if d.startswith(".") or _loops_back(path, tree) or os.path.realpath(path) in seen:
                continue
            seen.add(os.path.realpath(path))
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not _is_image_file(f) or _loops_back(path, tree):
                continue
            if regular_file_problem(path) is None:
                found.append(path)
            elif skipped is not None:
                skipped.append(path)
    return sorted(found)


def _class_folders(folder: str, tree: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
                  and not _loops_back(e.path, tree))


def _image_class_folders(folder: str, tree: str) -> list[str]:
    """Sub-folders of ``folder`` that are classes; an empty one among non-empty ones is an error
    (an empty folder alone, e.g. a stray ``logs/``, is not taken for a class set)."""
    folders = _class_folders(folder, tree)
    empty = [f for f in folders if not _list_images(os.path.join(folder, f), tree)]
    if empty and len(empty) < len(folders):
        raise ValueError(f"root: class folder(s) {[os.path.join(folder, f) for f in empty]} "
                         "contain no images")
    return [f for f in folders if f not in empty]


def _readable(path: str) -> bool:
    try:
        with open_regular_file(path) as f, Image.open(f) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError...)
        return False


def _drop_unreadable(samples: list[Sample], skipped: list[str]) -> list[Sample]:
    kept = []
    for path, label in samples:
        if _readable(path):
            kept.append((path, label))
        else:
            skipped.append(path)
    return kept


def _warn_skipped(skipped: list[str], where: str) -> None:
    if skipped:
        shown = ", ".join(_described(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3
                                                                   else "")
        warnings.warn(f"fastprompt: skipped {len(skipped)} unreadable image file(s) in {where}: "
                      f"{shown}", UserWarning, stacklevel=3)


def _described(path: str) -> str:
    problem = regular_file_problem(path)
    return repr(path) if problem is None else f"{path!r} ({problem.removeprefix('is ')})"


def _check_root(root) -> str:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path, got {type(root).__name__}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"root: {root!r} is not a directory")
    return root


def _check_classes(classnames: list[str], where: str) -> None:
    if len(classnames) == 0:
        raise ValueError(f"root: no class sub-folders with images in {where!r} (image files "
                         f"ending in {', '.join(IMAGE_EXTENSIONS)})")
    if len(classnames) == 1:
        raise ValueError(f"root: found only one class ({classnames[0]!r}) in {where!r}; "
                         "classification needs at least 2 classes")
    if len(set(classnames)) != len(classnames):
        dup = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"root: class folders in {where!r} map to the same class name {dup} "
                         "(underscores become spaces)")


def _read_class_tree(folder: str, folders: list[str], tree: str,
                     skipped: list[str]) -> list[Sample]:
    samples = []
    for label, name in enumerate(folders):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        samples.extend((p, label) for p in _list_images(sub, tree, skipped))
    return samples


def _split_folders(root: str) -> dict[str, str]:
    """``{"train"|"test"|"val": folder}`` of a split layout, {} for a class-folder layout;
    ValueError for a layout that could be read either way."""
    folders = _class_folders(root, root)
    found: dict[str, list[str]] = {}
    for f in folders:
        split = SPLIT_FOLDERS.get(f.lower())
        if split is not None:
            found.setdefault(split, []).append(f)
    if not found:
        return {}
    twice = {k: v for k, v in found.items() if len(v) > 1}
    if twice:
        raise ValueError(f"root: {root!r} has several folders for one split {twice}; keep one")
    others = [f for f in folders if f.lower() not in SPLIT_FOLDERS and _list_images(
        os.path.join(root, f), root)]
    names = sorted(v[0] for v in found.values())
    if others:
        raise ValueError(f"root: {root!r} mixes split folders {names} with other folders holding "
                         f"images {others[:5]}; use either train/ and test/ (val/) with the "
                         "class folders inside, or class folders only")
    if "train" not in found or "test" not in found:
        raise ValueError(f"root: {root!r} has split folder(s) {names} but not both a train and "
                         "a test folder; add the missing one (a validation folder does not "
                         "replace the test split)")
    return {k: os.path.join(root, v[0]) for k, v in found.items()}


def load_image_folder(root, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 1,
                      check_images: bool = True, for_testing: bool = False) -> DatasetSplits:
    """Read a class-folder data set: ``root/<class>/.../<image>``.

    If ``root/train`` and ``root/test`` exist they are the splits (and ``root/val`` the
    validation split, if present); the classes are the sub-folders of ``root/train``. Otherwise
    every sub-folder of ``root`` is a class, and each class's images (sorted by path) are split
    deterministically from ``seed``: ``round(n * test_fraction)`` go to test, kept between 1 and
    ``n - 1`` when ``n >= 2`` and ``test_fraction > 0`` (default ``test_fraction`` 0.2).

    Split folders are matched case-insensitively, ``val``/``valid``/``validation`` for
    validation; a layout mixing split folders and class folders is refused (see the module
    docstring). Class names are the folder names with underscores as spaces (NFC), classes
    sorted by folder name; labels index that order. Image files are those ending in
    :data:`IMAGE_EXTENSIONS`, found recursively; hidden files and folders, and links back into
    the tree, are ignored.

    With ``check_images`` every class must keep a readable training image; ``for_testing``
    (the data set is read to be evaluated on): a readable image in any split, and the error
    calls them test images.
    """
    root = _check_root(root)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction: expected a float, got {type(test_fraction).__name__}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction: must lie in [0, 1), got {test_fraction}")
    check_seed(seed)
    split_dirs = _split_folders(root)
    skipped: list[str] = []
    if split_dirs:
        train_dir = split_dirs["train"]
        folders = _image_class_folders(train_dir, root)
        classnames = [classname_from_folder(f, "root") for f in folders]
        _check_classes(classnames, train_dir)
        splits = {}
        for split in ("train", "test", "val"):
            split_dir = split_dirs.get(split)
            if split_dir is None:
                splits[split] = []
                continue
            extra = [f for f in _class_folders(split_dir, root)
                     if f not in folders and _list_images(os.path.join(split_dir, f), root)]
            if extra:
                raise ValueError(f"root: {split_dir!r} has class folder(s) {extra} with images "
                                 f"that {train_dir!r} lacks")
            samples = _read_class_tree(split_dir, folders, root, skipped)
            splits[split] = _drop_unreadable(samples, skipped) if check_images else samples
        _warn_skipped(skipped, root)
        if check_images:
            _check_every_class_kept(splits, classnames, train_dir, for_testing)
        return DatasetSplits(classnames, splits["train"], splits["test"], splits["val"], root,
                             skipped)

    folders = _image_class_folders(root, root)
    classnames = [classname_from_folder(f, "root") for f in folders]
    _check_classes(classnames, root)
    per_class = []
    for label, name in enumerate(folders):
        paths = _list_images(os.path.join(root, name), root, skipped)
        if check_images:
            paths = [p for p, _ in _drop_unreadable([(p, label) for p in paths], skipped)]
        per_class.append(paths)
    _warn_skipped(skipped, root)
    if check_images:
        readable = [(p, y) for y, ps in enumerate(per_class) for p in ps]
        _check_every_class_kept({"train": readable}, classnames, root, for_testing)
    train, test = [], []
    for label, (name, paths) in enumerate(zip(folders, per_class)):
        rng = random.Random(f"fastprompt.split:{seed}:{name}")
        order = list(range(len(paths)))
        rng.shuffle(order)
        n = len(paths)
        n_test = 0
        if test_fraction > 0 and n >= 2:
            n_test = min(max(round(n * test_fraction), 1), n - 1)
        test_ids = set(order[:n_test])
        for i, p in enumerate(paths):
            (test if i in test_ids else train).append((p, label))
    return DatasetSplits(classnames, train, test, [], root, skipped)


def _check_every_class_kept(splits: dict[str, list[Sample]], classnames: list[str], where: str,
                            for_testing: bool, arg: str = "root") -> None:
    """Every class keeps a readable image: a training one, or (``for_testing``: the data set is
    read to be evaluated on) one in any split, called a test image."""
    used = [s for split, s in splits.items() if for_testing or split == "train"]
    present = {y for samples in used for _, y in samples}
    missing = [c for i, c in enumerate(classnames) if i not in present]
    if missing:
        raise ValueError(f"{arg}: class(es) {missing} in {where!r} have no readable "
                         f"{'test' if for_testing else 'training'} images")


def find_split_file(root) -> str | None:
    """The single ``split_zhou_*.json`` in ``root``; None if there is none."""
    found = sorted(glob.glob(os.path.join(glob.escape(os.fspath(root)), "split_zhou_*.json")))
    if len(found) > 1:
        raise ValueError(f"root: several split files in {os.fspath(root)!r} "
                         f"({[os.path.basename(f) for f in found]}); pass split_file")
    return found[0] if found else None


def _image_root_for(base: str, first: str) -> str:
    """CoOp keeps split files next to the image folder (``oxford_pets/images``,
    ``caltech-101/101_ObjectCategories``): try ``base``, then its sub-folders."""
    candidates = [base] + [os.path.join(base, d) for d in _class_folders(base, base)]
    for cand in candidates:
        if os.path.isfile(os.path.join(cand, first)):
            return cand
    return base


def load_coop_split(split_file, image_root=None, *, check_images: bool = True,
                    for_testing: bool = False) -> DatasetSplits:
    """Read a CoOp split file ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``.

    Paths are relative to ``image_root``; by default the split file's folder, or the first of its
    sub-folders holding the first listed image (CoOp's ``$DATA/oxford_pets/images`` with the
    split in ``$DATA/oxford_pets``). Class names come from the file (underscores as spaces),
    ordered by label; labels must be ``0..C-1`` and each label must always carry one class name.
    A listed file that does not exist raises ``ValueError`` naming it. ``check_images`` and
    ``for_testing`` as for :func:`load_image_folder`.
    """
    if not isinstance(split_file, (str, os.PathLike)):
        raise TypeError(f"split_file: expected a path, got {type(split_file).__name__}")
    split_file = os.path.abspath(os.fspath(split_file))
    if not os.path.isfile(split_file):
        raise ValueError(f"split_file: {split_file!r} is not a file")
    content = read_json(split_file, "split_file")
    if not isinstance(content, dict) or "train" not in content or "test" not in content:
        raise ValueError(f"split_file: {split_file!r} must be a JSON object with 'train' and "
                         "'test' lists (and optionally 'val')")
    unknown = set(content) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"split_file: {split_file!r} has unknown keys {sorted(unknown)}")
    names: dict[int, str] = {}
    for split, entries in content.items():
        if not isinstance(entries, list):
            raise ValueError(f"split_file: {split_file!r}: '{split}' must be a list")
        for i, entry in enumerate(entries):
            if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], int)
                    or not isinstance(entry[2], str)):
                raise ValueError(f"split_file: {split_file!r}: {split}[{i}] must be "
                                 f"[relative_path, label, classname], got {entry!r}")
            label, name = entry[1], classname_from_folder(entry[2], f"split_file: {split_file!r}")
            if names.setdefault(label, name) != name:
                raise ValueError(f"split_file: {split_file!r}: label {label} is named both "
                                 f"{names[label]!r} and {name!r}")
    if not content["train"]:
        raise ValueError(f"split_file: {split_file!r}: the 'train' list is empty")
    num_classes = len(names)
    if sorted(names) != list(range(num_classes)):
        raise ValueError(f"split_file: {split_file!r}: labels must be 0..C-1, got "
                         f"{sorted(names)[:10]}")
    classnames = [names[i] for i in range(num_classes)]
    _check_classes(classnames, split_file)

    if image_root is None:
        image_root = _image_root_for(os.path.dirname(split_file), content["train"][0][0])
    image_root = os.path.abspath(os.fspath(image_root))
    _confine(split_file, image_root, content)
    skipped: list[str] = []
    splits = {}
    for split in ("train", "test", "val"):
        samples = []
        for rel, label, _ in content.get(split, []):
            path = os.path.normpath(os.path.join(image_root, rel))
            problem = regular_file_problem(path)
            if problem is not None:
                raise ValueError(f"split_file: {split_file!r} lists {rel!r} ({split}), but "
                                 f"{path!r} {problem}")
            samples.append((path, label))
        splits[split] = _drop_unreadable(samples, skipped) if check_images else samples
    _warn_skipped(skipped, split_file)
    if check_images:
        _check_every_class_kept(splits, classnames, split_file, for_testing, "split_file")
    return DatasetSplits(classnames, splits["train"], splits["test"], splits["val"], image_root,
                         skipped)


def _confine(split_file: str, image_root: str, content: dict) -> None:
    """Refuse, in one message and before touching any of them, listed paths that are absolute
    or lead out of the image root (``../``): a split file names images under its root only."""
    outside = []
    for split in ("train", "test", "val"):
        for i, (rel, _, _) in enumerate(content.get(split, [])):
            path = os.path.normpath(os.path.join(image_root, rel))
            if os.path.isabs(rel) or not (path + os.sep).startswith(image_root + os.sep):
                outside.append(f"{split}[{i}]")
    if outside:
        raise ValueError(f"split_file: {split_file!r} lists {len(outside)} path(s) outside the "
                         f"image root {image_root!r} (absolute or with '..'; first: "
                         f"{', '.join(outside[:3])}); paths must be relative to the root and "
                         "stay inside it")


def load_dataset(root, *, split_file=None, test_fraction: float = DEFAULT_TEST_FRACTION,
                 seed: int = 1, check_images: bool = True,
                 for_testing: bool = False) -> DatasetSplits:
    """Read a data set in either layout: a CoOp split file if ``split_file`` is given or ``root``
    holds one ``split_zhou_*.json``, class folders otherwise (see :func:`load_image_folder`).

    ``split_file`` lies in ``root``: a path relative to it, or an absolute path inside it (one
    outside is refused: the images a split file lists are read relative to its own folder, so
    ``root`` would be silently ignored)."""
    root = _check_root(root)
    if split_file is None:
        split_file = find_split_file(root)
        if split_file is None:
            return load_image_folder(root, test_fraction=test_fraction, seed=seed,
                                     check_images=check_images, for_testing=for_testing)
    else:
        given = os.fspath(split_file)
        split_file = os.path.normpath(os.path.join(root, given))
        if os.path.commonpath([root, split_file]) != root:
            raise ValueError(f"split_file: {given!r} is outside the data folder {root!r}; give "
                             "the split file of that folder (relative to it, or an absolute path "
                             "inside it): the images a split file lists are read relative to its "
                             "own folder")
    return load_coop_split(split_file, check_images=check_images, for_testing=for_testing)
