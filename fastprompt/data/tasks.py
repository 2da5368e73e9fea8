"""Several classification tasks for multi-task prompt tuning (SoftCPT): the tasks file, its
validation, loading every task's data set, and a generated multi-task shapes set.

A tasks file (``TASKS.json``) is a JSON list with one object per task::

    [{"name": "flower species", "data": "data/oxford_flowers",
      "split_file": "split_zhou_OxfordFlowers.json"},
     {"name": "pet breeds", "data": "data/oxford_pets"}]

``name`` is the task's name as the task prompt reads it (underscores become spaces; names must
differ after lower-casing, as the tokenizer does). ``data`` is a data folder as ``--data`` takes
it (class folders, ``train/`` and ``test/``, or a CoOp split's image root), relative paths being
relative to the tasks file's folder. ``split_file`` (optional) is a CoOp split file, relative to
``data`` as ``--split-file`` is. Every task needs at least two classes. Everything is checked,
and every task's data set read, before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from fastprompt._checks import check_class_name
from fastprompt._io import dumps_json, read_json
from fastprompt.data.folders import DEFAULT_TEST_FRACTION, DatasetSplits, load_dataset
from fastprompt.data.synthetic import make_shapes_dataset

TASK_KEYS = ("name", "data", "split_file")
_SHAPES_MARKER = "fastprompt_shapes_tasks.json"
TASKS_FILE = "tasks.json"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its data folder (absolute) and optional split file (absolute)."""
    name: str
    data: str
    split_file: str | None = None


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def check_task_specs(specs: Sequence[TaskSpec], where: str = "tasks") -> list[TaskSpec]:
    """Validate tasks: at least one, non-empty distinct names checked as class names are
    (``check_class_name``: NFC, no control or format characters), existing folders and split
    files. Returns the specs with their names normalised; raises ValueError naming ``where``
    and the task."""
    specs = list(specs)
    if not specs:
        raise ValueError(f"{where}: no tasks given")
    seen: dict[str, str] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec.name, str) or not _name_key(spec.name):
            raise ValueError(f"{where}: task {i + 1} has an empty name")
        spec = specs[i] = dataclasses.replace(
            spec, name=check_class_name(spec.name, where, f"task {i + 1} name"))
        key = _name_key(spec.name)
        if key in seen:
            raise ValueError(f"{where}: duplicate task name {spec.name!r} (tasks {seen[key]} and "
                             f"{i + 1}; names are compared lower-cased, underscores as spaces)")
        seen[key] = str(i + 1)
        if not os.path.isdir(spec.data):
            raise ValueError(f"{where}: task {spec.name!r}: data folder {spec.data!r} does not "
                             "exist" + (" (it is a file)" if os.path.exists(spec.data) else ""))
        if spec.split_file is not None and not os.path.isfile(spec.split_file):
            raise ValueError(f"{where}: task {spec.name!r}: split file {spec.split_file!r} does "
                             "not exist")
    return specs


def read_tasks_file(path) -> list[TaskSpec]:
    """Read and validate ``TASKS.json`` (see the module docstring); ValueError naming the file
    and the task for anything wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"tasks: expected a file path, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    where = f"tasks file {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"tasks: {path!r} is not a file")
    content = read_json(path, "tasks")
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}: expected a non-empty JSON list of "
                         '{"name": ..., "data": ..., "split_file": ...} objects')
    base = os.path.dirname(path)
    specs = []
    for i, entry in enumerate(content):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {i + 1} must be an object, got {entry!r:.100}")
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise ValueError(f"{where}: entry {i + 1} has unknown keys {unknown} (allowed: "
                             f"{list(TASK_KEYS)})")
        for key in ("name", "data"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ValueError(f"{where}: entry {i + 1} needs a non-empty string {key!r}")
        split = entry.get("split_file")
        if split is not None and (not isinstance(split, str) or not split.strip()):
            raise ValueError(f"{where}: entry {i + 1}: 'split_file' must be a non-empty string")
        data = os.path.normpath(os.path.join(base, os.path.expanduser(entry["data"])))
        if split is not None:
            split = os.path.normpath(os.path.join(data, os.path.expanduser(split)))
        specs.append(TaskSpec(entry["name"].strip(), data, split))
    return check_task_specs(specs, where)


def task_specs_from_folders(folders: Sequence[str], names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Tasks from data folders (``--data A --data B``), named by ``names`` or, without them, by
    each folder's name (underscores as spaces)."""
    folders = [os.path.abspath(os.fspath(f)) for f in folders]
    if names is None:
        names = [os.path.basename(f.rstrip(os.sep)).replace("_", " ") for f in folders]
    elif len(names) != len(folders):
        raise ValueError(f"--task-names: {len(names)} names for {len(folders)} --data folders")
    return check_task_specs([TaskSpec(n, f) for n, f in zip(names, folders)], "--data")


def load_task_datasets(specs: Sequence[TaskSpec], *, test_fraction: float = DEFAULT_TEST_FRACTION,
                       seed: int = 1, check_images: bool = True) -> list[DatasetSplits]:
    """Each task's splits (``load_dataset``); a task that cannot be read, or has fewer than two
    classes, raises ValueError naming the task."""
    out = []
    for spec in check_task_specs(specs):
        try:
            splits = load_dataset(spec.data, split_file=spec.split_file,
                                  test_fraction=test_fraction, seed=seed,
                                  check_images=check_images)
        except ValueError as e:
            raise ValueError(f"tasks: task {spec.name!r} ({spec.data}): {e}") from None
        if splits.num_classes < 2:  # load_dataset refuses this already; kept as a guarantee
            raise ValueError(f"tasks: task {spec.name!r} has {splits.num_classes} class; a task "
                             "needs at least two")
        if not splits.train:
            raise ValueError(f"tasks: task {spec.name!r} has no training images")
        out.append(splits)
    return out


def make_shapes_tasks(root, num_tasks: int = 3, classes_per_task: int = 4,
                      images_per_class: int = 16, *, test_images_per_class: int | None = None,
                      size: int = 64, seed: int = 0) -> str:
    """Generate ``num_tasks`` shapes data sets with disjoint classes and a tasks file for them;
    return the tasks file's path (``root/tasks.json``).

    One shapes set of ``num_tasks * classes_per_task`` classes (``make_shapes_dataset``, at
    most 42) is cut into consecutive blocks of ``classes_per_task`` classes: task ``k`` (named
    "shapes a", "shapes b", ...) lives in ``root/task_<k>/{train,test}/``. Written to a
    temporary folder and renamed into place; an existing ``root`` made with the same arguments
    is reused, any other non-empty one refused.
    """
    for name, value, low in (("num_tasks", num_tasks, 1), ("classes_per_task", classes_per_task, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if num_tasks > 26:
        raise ValueError(f"num_tasks: at most 26, got {num_tasks}")
    root = os.path.abspath(os.fspath(root))
    params = {"generator": "fastprompt.shapes_tasks/1", "num_tasks": num_tasks,
              "classes_per_task": classes_per_task, "images_per_class": images_per_class,
              "test_images_per_class": test_images_per_class, "size": size, "seed": seed}
    tasks_path = os.path.join(root, TASKS_FILE)
    if os.path.isdir(root) and os.listdir(root):
        try:
            with open(os.path.join(root, _SHAPES_MARKER), encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing != params or not os.path.isfile(tasks_path):
            raise ValueError(f"root: {root!r} exists and is not a shapes task set made with these "
                             "arguments; choose an empty or new folder")
        return tasks_path
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        source = make_shapes_dataset(os.path.join(tmp, "_source"),
                                     num_classes=num_tasks * classes_per_task,
                                     images_per_class=images_per_class,
                                     test_images_per_class=test_images_per_class, size=size,
                                     seed=seed)
        entries = []
        for k in range(num_tasks):
            folder = f"task_{k}"
            classes = source.classnames[k * classes_per_task:(k + 1) * classes_per_task]
            for split in ("train", "test"):
                for cls in classes:
                    sub = cls.replace(" ", "_")
                    shutil.copytree(os.path.join(source.root, split, sub),
                                    os.path.join(tmp, folder, split, sub))
            entries.append({"name": f"shapes {chr(ord('a') + k)}", "data": folder})
        shutil.rmtree(os.path.join(tmp, "_source"))
        with open(os.path.join(tmp, TASKS_FILE), "w", encoding="utf-8") as f:
            f.write(dumps_json(entries, indent=1))
        with open(os.path.join(tmp, _SHAPES_MARKER), "w", encoding="utf-8") as f:
            f.write(dumps_json(params, indent=1))
        os.chmod(tmp, 0o755)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tasks_path
