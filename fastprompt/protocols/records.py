"""What the plots and the report read from a run folder (``metrics.json``, ``evaluation.json``),
checked as it is read: a field of the wrong type is refused naming the file and the field's path
(``epochs[3].loss``), never met later as a bare ``TypeError``."""
from __future__ import annotations

import os

from fastprompt._io import read_json
from fastprompt.train.files import METRICS, read_metrics

_KINDS = {"number": ((int, float), "a number"), "number or null": ((int, float, type(None)),
          "a number or null"), "int": ((int,), "an int"), "int or null": ((int, type(None)),
          "an int or null"), "object": ((dict,), "an object"), "list": ((list,), "a list"),
          "str": ((str,), "a str")}


def expect(value, kind: str, what: str, path: str, where: str):
    """``value`` if it is of ``kind`` (a bool is no number); ValueError naming the file and the
    field otherwise."""
    types, said = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"{what}: {path}: {where}: expected {said}, got "
                         f"{type(value).__name__} {value!r:.60}")
    return value


def _optional(d: dict, key: str, kind: str, what: str, path: str, where: str):
    """``d[key]`` of ``kind``, or None where it is absent or null."""
    return expect(d[key], kind, what, path, f"{where}{key}") if d.get(key) is not None else None


def _required(d: dict, key: str, kind: str, what: str, path: str, where: str):
    """``d[key]``, present and of ``kind``."""
    if key not in d:
        raise ValueError(f"{what}: {path}: {where}{key} is missing")
    return expect(d[key], kind, what, path, f"{where}{key}")


def run_metrics(run_dir, what: str = "run", *, missing: str = "did training finish?") -> dict:
    """A run's metrics.json (``read_metrics``) with what the plots and the report take from it
    checked: the epochs' records, the accuracies, the cache fingerprints named in titles."""
    metrics = read_metrics(run_dir, what, missing=missing)
    path = os.path.join(os.fspath(run_dir), METRICS)
    for key in ("test_acc", "zeroshot_test_acc"):
        _optional(metrics, key, "number", what, path, "")
    history = metrics.get("epochs")
    if history is not None:
        expect(history, "list", what, path, "epochs")
        for i, h in enumerate(history):
            expect(h, "object", what, path, f"epochs[{i}]")
            _required(h, "epoch", "int", what, path, f"epochs[{i}].")
            _required(h, "loss", "number or null", what, path, f"epochs[{i}].")
            for key in ("kl_loss", "train_acc_noisy", "train_acc_clean"):
                _optional(h, key, "number", what, path, f"epochs[{i}].")
    tasks = metrics.get("tasks")
    holders = [("", metrics)]
    if tasks is not None:
        holders += [(f"tasks[{i}].", expect(t, "object", what, path, f"tasks[{i}]"))
                    for i, t in enumerate(expect(tasks, "list", what, path, "tasks"))]
    for where, holder in holders:
        cache = _optional(holder, "cache", "object", what, path, where)
        fingerprint = _optional(cache or {}, "fingerprint", "object", what, path,
                                f"{where}cache.")
        if fingerprint:
            where = f"{where}cache.fingerprint."
            _optional(fingerprint, "shots", "int", what, path, where)
            _optional(fingerprint, "noise_rate", "number", what, path, where)
            _optional(fingerprint, "noise_type", "str", what, path, where)
            _optional(fingerprint, "noise_per_class", "int", what, path, where)
    return metrics


def run_evaluation(path: str, what: str = "run") -> dict:
    """A run's evaluation.json (base-to-new or cross-dataset accuracies), checked."""
    evaluation = expect(read_json(path, what), "object", what, path, "the file")
    if "base_to_new" in evaluation:
        b = expect(evaluation["base_to_new"], "object", what, path, "base_to_new")
        for key in ("base_acc", "new_acc", "hm"):
            _required(b, key, "number or null", what, path, "base_to_new.")
        zero_shot = _required(b, "zeroshot", "object", what, path, "base_to_new.")
        for key in ("base_acc", "new_acc", "hm"):
            _required(zero_shot, key, "number or null", what, path, "base_to_new.zeroshot.")
    targets = expect(evaluation.get("targets", {}), "object", what, path, "targets")
    for name, t in targets.items():
        expect(t, "object", what, path, f"targets.{name}")
        for key in ("test_acc", "zeroshot_test_acc"):
            _required(t, key, "number or null", what, path, f"targets.{name}.")
    return evaluation
