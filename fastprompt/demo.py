"""``fastprompt demo``: the whole pipeline on an embedded default that needs nothing from outside.

Generates a labelled image data set of coloured shapes, creates the tiny open_clip model with
random weights and saves it to a file (then loads it back through ``--pretrained``, the real
loading path), caches the image features with augmented views, trains every method briefly,
prints a table of test accuracy and epoch time per method (zero-shot first), exports the first
run to ONNX and classifies test images with onnxruntime; then SoftCPT over generated tasks, and a
small label-noise sweep with its report and plots.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from PIL import Image
from safetensors.torch import save

from fastprompt import _backend
from fastprompt._io import atomic_write, write_text_atomic
from fastprompt.data import build_or_load_cache, make_shapes_dataset
from fastprompt.data.tasks import load_task_datasets, make_shapes_tasks, read_tasks_file
from fastprompt.models import TINY_MODEL, create_model
from fastprompt.pipeline import export_run
from fastprompt.protocols.sweep import run_sweep
from fastprompt.protocols.sweep_grid import load_spec
from fastprompt.serve import OnnxClassifier
from fastprompt.train import (RunMismatchError, Task, TrainConfig, load_run, train_run,
                              train_softcpt_run)
from fastprompt.train.files import RUN_FILES

DEMO_CLASSES = 8
DEMO_IMAGES_PER_CLASS = 24
DEMO_VIEWS = 8
DEMO_NOISE_RATE = 0.25
# SoftCPT section: a few generated tasks with disjoint classes.
DEMO_TASKS = 3
DEMO_CLASSES_PER_TASK = 4
DEMO_TASK_IMAGES_PER_CLASS = 16
DEMO_TASK_VIEWS = 4
# Sweep section: a few methods x 2 noise rates x 2 seeds, few-shot, to show the report and plots.
DEMO_SWEEP_METHODS = ("coop", "dspt", "dspt+isl(alt)", "gce", "coop+nlprompt")
DEMO_SWEEP_NOISE_RATES = (0.0, 0.5)
DEMO_SWEEP_SEEDS = (1, 2)
DEMO_SWEEP_SHOTS = 4
DEMO_SWEEP_VIEWS = 2
DEMO_SWEEP_MAX_EPOCHS = 10  # 20 runs: kept short so the demo stays near a minute
# Marks a run folder as the demo's own: only such folders are ever cleared for a retrain.
DEMO_MARKER = ".fastprompt-demo"

# (label, TrainConfig overrides): the baseline, each method and plug-in, and combinations.
DEMO_METHODS = (
    ("coop", {}),
    ("dspt", {"loss": "dspt"}),
    ("coop+ls", {"targets": "ls"}),
    ("coop+csl(alt)", {"targets": "csl", "alternate": True}),
    ("coop+isl(alt)", {"targets": "isl", "alternate": True}),
    ("coop+prograd", {"prograd": True}),
    ("dspt+isl(alt)+prograd", {"loss": "dspt", "targets": "isl", "alternate": True, "prograd": True}),
    ("gce", {"loss": "gce"}),
    ("coop+nlprompt", {"nlprompt": True}),
    ("coop+joapr", {"joapr": True}),
    ("coop+dept", {"dept": True}),
    # Other learners, each from its official config, with the same epochs and batch size.
    ("kgcoop", {"learner": "kgcoop"}),
    # TCP injects at text layer 8 of ViT-B's 12; the tiny tower has 2, so its last one.
    ("tcp", {"learner": "tcp", "tcp_layer": 1}),
    ("cocoop", {"learner": "cocoop"}),
)


def _random_tiny_checkpoint(path: str) -> str:
    """Save a seeded random-initialised tiny model once, so every run rebuilds the same weights."""

    if not os.path.isfile(path):
        torch.manual_seed(0)
        model = create_model(TINY_MODEL)[0]
        data = save({k: v.contiguous() for k, v in model.state_dict().items()})
        atomic_write(path, lambda f: f.write(data))
    return path


def _demo_folder(run_dir: str) -> None:
    """Make ``run_dir`` the demo's own (marked), or refuse it when it holds anything else."""
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not os.path.isfile(
            os.path.join(run_dir, DEMO_MARKER)):
        raise ValueError(f"out: {run_dir!r} exists and was not made by the demo; the demo leaves "
                         "it alone: choose another --out")
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, DEMO_MARKER), "a").close()


def _clear_demo_run(run_dir: str) -> None:
    """Remove the run files of a demo run from other settings; anything else in the folder
    (which the demo did not write) makes it refuse instead."""
    ours = {*RUN_FILES, DEMO_MARKER}
    foreign = sorted(set(os.listdir(run_dir)) - ours)
    if foreign:
        raise ValueError(f"out: {run_dir!r} holds a run from other settings and files the demo "
                         f"did not write ({', '.join(foreign[:3])}); choose another --out")
    for name in ours - {DEMO_MARKER}:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def _train(train, run_dir: str, *args, progress: bool):
    """``train(*args, run_dir, ...)``, resuming the demo's earlier run of the same settings;
    a run from other settings (an earlier demo with other --epochs) is retrained."""
    _demo_folder(run_dir)
    try:
        return train(*args, run_dir, resume=True, progress=progress)
    except RunMismatchError:
        _clear_demo_run(run_dir)
        return train(*args, run_dir, progress=progress)


def run_demo(out: str = "demo_runs", *, epochs: int = 40, progress: bool = True) -> int:

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    print("fastprompt demo: the tiny open_clip model has RANDOM weights, so accuracies show the "
          "pipeline working, not what prompt tuning achieves. Real use: see README "
          "(--model ViT-B-16 --pretrained FILE --data DIR).\n")
    splits = make_shapes_dataset(os.path.join(out, "shapes"), num_classes=DEMO_CLASSES,
                                 images_per_class=DEMO_IMAGES_PER_CLASS,
                                 test_images_per_class=DEMO_IMAGES_PER_CLASS // 2)
    weights = _random_tiny_checkpoint(os.path.join(out, f"{TINY_MODEL}-random.safetensors"))
    model, preprocess_train, preprocess_val, tokenizer = create_model(TINY_MODEL, weights)
    print(f"data: {len(splits.classnames)} classes ({', '.join(splits.classnames[:3])}, ...), "
          f"{len(splits.train)} training images with {DEMO_NOISE_RATE:.0%} symmetric label noise, "
          f"{len(splits.test)} test images")
    t = time.perf_counter()
    cache = build_or_load_cache(os.path.join(out, "features.safetensors"), model, TINY_MODEL,
                                preprocess_train, preprocess_val, splits, views=DEMO_VIEWS,
                                noise_rate=DEMO_NOISE_RATE, seed=1, progress=progress)
    print(f"feature cache: {cache.train_features.shape[0]} training rows "
          f"({cache.num_train_images} images x {cache.views} views), {time.perf_counter() - t:.1f} s "
          f"(built once, reused by every method and epoch)")
    print(f"loss backend on CPU: {_backend.resolve(torch.device('cpu'))}\n")

    rows = []
    first_run = None
    for label, overrides in DEMO_METHODS:
        overrides = dict(overrides)
        config = TrainConfig.for_learner(overrides.pop("learner", "coop"), model=TINY_MODEL,
                                         pretrained=os.path.abspath(weights), epochs=epochs,
                                         batch_size=32, **overrides)
        run_dir = os.path.join(out, "runs", label.replace("(", "-").replace(")", ""))
        metrics = _train(train_run, run_dir, config, cache, model, tokenizer, progress=progress)
        if not rows:
            rows.append(("zero-shot", "-", metrics["zeroshot_test_acc"], "-", "-"))
            first_run = run_dir
        last = metrics["epochs"][-1]
        rows.append((label, f"{metrics['epoch_seconds_median'] * 1e3:.1f}", metrics["test_acc"],
                     f"{last['train_acc_clean']:.3f}", f"{last['train_acc_noisy']:.3f}"))

    header = ("method", "epoch ms", "test acc", "train acc (clean)", "train acc (noisy)")
    widths = [max(len(header[i]), *(len(f"{r[i]:.3f}" if isinstance(r[i], float) else str(r[i]))
                                    for r in rows)) for i in range(len(header))]
    print(f"\n{epochs} epochs per method, batch 32, {cache.num_train_images} images per epoch:")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join((f"{v:.3f}" if isinstance(v, float) else str(v)).ljust(w)
                        for v, w in zip(r, widths)))

    export_dir = os.path.join(out, "export")
    print(f"\nexporting {first_run} to ONNX ...")
    report = export_run(first_run, export_dir, seed=0)
    print(report.summary())
    classifier = OnnxClassifier(export_dir)
    images = [path for path, _ in splits.test[:: max(1, len(splits.test) // 4)]][:4]
    predictions = classifier.predict(images, top_k=1)
    x = torch.stack([preprocess_val(_rgb(p)) for p in images])
    with torch.no_grad():
        run = load_run(first_run)
        feats = torch.nn.functional.normalize(run.model.encode_image(x).float(), dim=-1)
        text = torch.nn.functional.normalize(run.text_features, dim=-1)
        torch_probs = (run.scale * feats @ text.t()).softmax(-1)
    ort_probs = torch.from_numpy(classifier.predict_proba(images))
    print("onnxruntime predictions on test images:")
    for path, pred in zip(images, predictions):
        name, prob = pred[0]
        print(f"  {os.path.relpath(path, out)} -> {name} ({prob:.3f})")
    print(f"max |probs(torch) - probs(onnxruntime)| over these images: "
          f"{float((torch_probs - ort_probs).abs().max()):.2e}")
    demo_multitask(out, model, preprocess_train, preprocess_val, tokenizer, weights,
                   epochs=epochs, progress=progress)
    demo_sweep(out, splits.root, weights, epochs=epochs)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; everything is in {out}/")
    sys.stdout.flush()
    return 0


def demo_multitask(out: str, model, preprocess_train, preprocess_val, tokenizer, weights: str, *,
                   epochs: int, progress: bool = True) -> dict:
    """Generate a few shapes tasks with disjoint classes, train SoftCPT on all of them and one
    CoOp prompt per task, and print test accuracy per task."""

    print(f"\nmulti-task (SoftCPT): {DEMO_TASKS} generated tasks of {DEMO_CLASSES_PER_TASK} "
          "disjoint shape classes each")
    root = os.path.join(out, "multitask")
    tasks_file = make_shapes_tasks(os.path.join(root, "data"), num_tasks=DEMO_TASKS,
                                   classes_per_task=DEMO_CLASSES_PER_TASK,
                                   images_per_class=DEMO_TASK_IMAGES_PER_CLASS,
                                   test_images_per_class=DEMO_TASK_IMAGES_PER_CLASS // 2, seed=3)
    specs = read_tasks_file(tasks_file)
    tasks = []
    for i, (spec, split) in enumerate(zip(specs, load_task_datasets(specs, seed=1))):
        cache = build_or_load_cache(os.path.join(root, f"features-{i}.safetensors"), model,
                                    TINY_MODEL, preprocess_train, preprocess_val, split,
                                    views=DEMO_TASK_VIEWS, seed=1, progress=progress)
        tasks.append(Task(spec.name, cache))
    base = dict(model=TINY_MODEL, pretrained=os.path.abspath(weights), epochs=epochs)
    soft = _train(train_softcpt_run, os.path.join(root, "softcpt"),
                  TrainConfig(learner="softcpt", **base), tasks, model, tokenizer,
                  progress=progress)
    coop = [_train(train_run, os.path.join(root, f"coop-{i}"), TrainConfig(**base), t.cache,
                   model, tokenizer, progress=progress) for i, t in enumerate(tasks)]

    rows = [(t["name"], str(t["num_classes"]), f"{t['zeroshot_test_acc']:.3f}",
             f"{c['test_acc']:.3f}", f"{t['test_acc']:.3f}")
            for t, c in zip(soft["tasks"], coop)]
    rows.append(("average", "", f"{soft['zeroshot_test_acc']:.3f}",
                 f"{sum(c['test_acc'] for c in coop) / len(coop):.3f}", f"{soft['test_acc']:.3f}"))
    header = ("task", "classes", "zero-shot", "CoOp (1 prompt/task)", "SoftCPT")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"{epochs} epochs each, batch 32; test accuracy per task:")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    coop_ms = sum(c["epoch_seconds_median"] for c in coop) * 1e3
    print(f"epoch time: SoftCPT over {len(tasks)} tasks {soft['epoch_seconds_median'] * 1e3:.1f} ms, "
          f"{len(tasks)} CoOp runs {coop_ms:.1f} ms in all; trained parameters: SoftCPT "
          f"{soft['trainable_parameters']} (meta network {soft['parameters']['meta_net']}, task "
          f"context {soft['parameters']['task_ctx']}), CoOp "
          f"{sum(c['trainable_parameters'] for c in coop)} ({len(coop)} x "
          f"{coop[0]['trainable_parameters']})")
    sys.stdout.flush()
    return {"softcpt": soft, "coop": coop}


def demo_sweep(out: str, data: str, weights: str, *, epochs: int) -> str:
    """A small noise sweep over the generated data (``fastprompt sweep``): a few methods x 2
    noise rates x 2 seeds, few-shot, at most ``DEMO_SWEEP_MAX_EPOCHS`` epochs; prints its table
    and where its report and plots are."""

    epochs = min(epochs, DEMO_SWEEP_MAX_EPOCHS)
    # One folder per epoch count: a rerun with the same count skips the finished runs.
    root = os.path.join(out, f"sweep-{epochs}-epochs")
    spec = {"data": os.path.abspath(data), "pretrained": os.path.abspath(weights),
            "methods": list(DEMO_SWEEP_METHODS), "shots": DEMO_SWEEP_SHOTS,
            "noise_rates": list(DEMO_SWEEP_NOISE_RATES), "seeds": list(DEMO_SWEEP_SEEDS),
            "views": DEMO_SWEEP_VIEWS, "train": {"epochs": epochs}}
    spec_path = root + ".json"
    write_text_atomic(spec_path, json.dumps(spec, indent=2) + "\n")
    runs = len(DEMO_SWEEP_METHODS) * len(DEMO_SWEEP_NOISE_RATES) * len(DEMO_SWEEP_SEEDS)
    print(f"\nsweep ({spec_path}): {', '.join(DEMO_SWEEP_METHODS)} x noise rates "
          f"{', '.join(f'{r:g}' for r in DEMO_SWEEP_NOISE_RATES)} x seeds "
          f"{', '.join(map(str, DEMO_SWEEP_SEEDS))}, {DEMO_SWEEP_SHOTS} shots, {epochs} epochs: "
          f"{runs} runs")
    result = run_sweep(load_spec(spec_path), root, progress=False, log=lambda *_: None)
    if result.failed:
        raise RuntimeError(f"demo sweep: {len(result.failed)} run(s) failed: {result.failed[0][1]}")
    report = os.path.join(root, "report.md")
    with open(report, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## "))
    for line in lines[start:]:
        if line.startswith("## Plots"):
            break
        print(line)
    plots = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".png"))
    print(f"report: {report} (and report.csv); plots: {', '.join(plots)}; training curves of "
          f"each run: {os.path.join(root, 'runs', '*', '*', '*', '*', 'curves.png')}")
    sys.stdout.flush()
    return report


def _rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")
