"""A trained run evaluated on other data and other classes: cross-dataset transfer, domain shift
and CoOp/CoCoOp's base-to-new generalisation.

``evaluate_on_data`` encodes a data set's test images with the run's frozen image tower (a
test-only feature cache, fingerprinted like every cache and reused while its images and the
model are unchanged), builds the classifier from the run's learned context and *that data set's*
class names (``fastprompt.train.transfer``), and reports top-1 accuracy, overall and per class,
next to the zero-shot accuracy of the same class names. ``base_to_new`` does this for both halves
of the classes of a run trained on the base half: base accuracy B, new accuracy N and their
harmonic mean H = 2·B·N / (B + N).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from fastprompt._checks import slug
from fastprompt.data import FeatureCache, build_or_load_cache, load_cache
from fastprompt.data.folders import DatasetSplits
from fastprompt.data.source import DataSource
from fastprompt.models import zeroshot_text_features
from fastprompt.protocols.stats import harmonic_mean
from fastprompt.train import load_run, load_runs
from fastprompt.train.files import METRICS, read_metrics
from fastprompt.train.runs import run_caches
from fastprompt.train.softcpt import task_mean
from fastprompt.train.transfer import with_classnames

EVAL_CACHE_DIR = "eval"


def eval_cache_path(cache_dir: str, source: DataSource, all_images: bool) -> str:
    """Where the test-only cache of ``source`` goes in ``cache_dir``: named after the folder and
    the half, with a digest of everything that selects the images."""
    key = json.dumps({**source.to_dict(), "all_images": all_images}, sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    name = f"{slug(os.path.basename(source.root), max_length=40, default='data')}-{source.subsample}-{digest}.safetensors"
    return os.path.join(cache_dir, name)


def _test_split(source: DataSource, all_images: bool) -> DatasetSplits:
    splits = source.load(for_testing=True)
    if splits.num_classes < 2:
        raise ValueError(f"data: the {source.subsample} half of {source.root!r} has "
                         f"{splits.num_classes} class; a classifier needs at least 2 (base-to-new "
                         "needs a data set of at least 4 classes)")
    test = splits.train + splits.val + splits.test if all_images else splits.test
    if not test:
        raise ValueError(f"data: {source.root!r} has no test images"
                         + ("" if all_images else " (--all-images takes every image)"))
    return DatasetSplits(splits.classnames, [], test, [], splits.root, splits.skipped)


@torch.no_grad()
def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor,
                       classnames: list[str]) -> tuple[float, list[dict]]:
    """Top-1 accuracy of the ``predicted`` classes (N) over all images and, per class,
    ``{"class", "accuracy", "num_images"}`` (accuracy None for a class without test images)."""
    predicted = predicted.cpu()
    correct = predicted == labels
    per_class = []
    for c, name in enumerate(classnames):
        mask = labels == c
        n = int(mask.sum())
        per_class.append({"class": name, "num_images": n,
                          "accuracy": int(correct[mask].sum()) / n if n else None})
    overall = int(correct.sum()) / len(labels) if len(labels) else float("nan")
    return overall, per_class


def evaluate_on_data(run_dir, source: DataSource, *, all_images: bool = False,
                     cache_dir: str | None = None, task: str | None = None,
                     device: str | torch.device = "cpu", batch_size: int = 128,
                     progress: bool | None = None) -> dict:
    """Accuracy of the run in ``run_dir`` on the test images of ``source`` (its class half),
    classifying among ``source``'s class names with the run's learned context.

    ``all_images``: every image of the data set is a test image (an evaluation-only set such as
    ImageNet-A laid out as class folders). ``cache_dir``: where the test-only feature cache goes
    (default ``RUN/eval/``; a sweep shares one folder between its runs). ``task``: the SoftCPT
    task whose context to use. Returns ``test_acc``, ``zeroshot_test_acc``,
    ``num_test_images``, ``num_classes``, ``per_class`` and ``data`` (the source).
    """
    run_dir = os.fspath(run_dir)
    run = load_run(run_dir, device, task)
    splits = _test_split(source, all_images)
    run = with_classnames(run, splits.classnames, device,
                          where=f"classnames of {source.root}")
    cache_dir = cache_dir if cache_dir is not None else os.path.join(run_dir, EVAL_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    # Test images get one plain view; the training transform enters the fingerprint only.
    cache = build_or_load_cache(eval_cache_path(cache_dir, source, all_images), run.model,
                                run.model_name, run.preprocess_val, run.preprocess_val, splits,
                                views=1, seed=source.seed, batch_size=batch_size,
                                progress=progress)
    acc, per_class = per_class_accuracy(run.predictions(cache.test_features), cache.test_labels,
                                        run.class_names)
    zeroshot = zeroshot_text_features(run.model, run.tokenizer, run.class_names).to(device)
    zs_predicted = (cache.test_features.float().to(device) @ zeroshot.t()).argmax(1)
    zs_acc, _ = per_class_accuracy(zs_predicted, cache.test_labels, run.class_names)
    return {"data": {**source.to_dict(), "all_images": all_images}, "test_acc": acc,
            "zeroshot_test_acc": zs_acc, "num_test_images": int(cache.test_labels.shape[0]),
            "num_classes": len(run.class_names), "per_class": per_class,
            "cache": cache.path}


def trained_source(run_dir) -> DataSource:
    """The ``DataSource`` a run recorded in its metrics.json (runs trained from ``--data``)."""
    path = os.path.join(os.fspath(run_dir), METRICS)
    data = read_metrics(run_dir).get("data")
    if data is None:
        raise ValueError(f"--base-to-new: {path} records no data folder (the run was trained "
                         "from --cache alone, or by an older fastprompt), so its base and new "
                         "classes are unknown; base-to-new evaluates a run trained with --data "
                         "DIR --subsample base (eval --data DIR --subsample new evaluates this "
                         "one on a half of DIR's classes)")
    return DataSource.from_dict(data, f"run: {path}: 'data'")


def base_to_new(run_dir, *, cache_dir: str | None = None, device: str | torch.device = "cpu",
                batch_size: int = 128, progress: bool | None = None) -> dict:
    """Base-to-new generalisation of a run trained with ``--subsample base``: its accuracy on the
    base classes' test images, on the new classes' (the other half of the same data set, named
    to the learned context as new classes), and H. The same numbers of the zero-shot classifier
    come under ``"zeroshot"``. Each half's full evaluation is under ``"base"`` and ``"new"``."""
    source = trained_source(run_dir)
    if source.subsample != "base":
        raise ValueError(f"--base-to-new: {os.fspath(run_dir)!r} was trained on "
                         f"--subsample {source.subsample}; base-to-new needs a run trained on "
                         "the base classes (--subsample base)")
    kwargs = dict(cache_dir=cache_dir, device=device, batch_size=batch_size, progress=progress)
    base = evaluate_on_data(run_dir, source, **kwargs)
    new = evaluate_on_data(run_dir, source.with_subsample("new"), **kwargs)
    b, n = base["test_acc"], new["test_acc"]
    zb, zn = base["zeroshot_test_acc"], new["zeroshot_test_acc"]
    return {"base_acc": b, "new_acc": n, "hm": harmonic_mean(b, n),
            "zeroshot": {"base_acc": zb, "new_acc": zn, "hm": harmonic_mean(zb, zn)},
            "base": base, "new": new}


def evaluate_run(run_dir, cache=None, device: str | torch.device = "cpu",
                 task: str | None = None) -> dict:
    """Test (and validation) accuracy of a trained run on feature caches of the same classes.

    ``cache``: a ``FeatureCache`` (or a path); None takes the caches the run was trained on
    (from its metrics.json). A SoftCPT run is evaluated on every task, or on ``task``; a given
    cache needs ``task`` unless the run has one task. Returns ``test_acc``, ``val_acc`` and
    ``num_test_images``; for SoftCPT also ``tasks``, one such record per task (the top-level
    accuracies are their average)."""
    runs = load_runs(run_dir, device, task, image_tower=False)
    softcpt = runs[0].task is not None
    if cache is not None and softcpt and len(runs) > 1:
        raise ValueError(f"task: {os.fspath(run_dir)!r} is a SoftCPT run over "
                         f"{len(runs)} tasks; with --cache name the task it belongs to (--task)")
    paths = run_caches(run_dir) if cache is None else None
    results = []
    for run in runs:
        c = cache if cache is not None else paths.get(run.task)
        if c is None:
            raise ValueError(f"run: metrics.json names no cache for task {run.task!r}; pass "
                             "--cache FILE")
        if not isinstance(c, FeatureCache):
            c = load_cache(c)
        if list(c.classnames) != list(run.class_names):
            raise ValueError(f"cache: its classes {c.classnames[:5]}... differ from the run's "
                             f"{run.class_names[:5]}...")
        result = {"test_acc": run.accuracy(c.test_features, c.test_labels),
                  "val_acc": run.accuracy(c.val_features, c.val_labels),
                  "num_test_images": int(c.test_features.shape[0])}
        results.append(result if run.task is None else {"name": run.task, **result})
    if not softcpt:
        return results[0]
    return {"tasks": results, "test_acc": task_mean(results, "test_acc"),
            "val_acc": task_mean(results, "val_acc"),
            "num_test_images": sum(r["num_test_images"] for r in results)}
