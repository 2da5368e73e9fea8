"""``fastprompt demo``: the whole pipeline on an embedded default that needs nothing from outside.

Generates a labelled image data set of coloured shapes, creates the tiny open_clip model with
random weights and saves it to a file (then loads it back through ``--pretrained``, the real
loading path), caches the image features with augmented views, trains every method briefly,
prints a table of test accuracy and epoch time per method (zero-shot first), exports the first
run to ONNX and classifies test images with onnxruntime.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import torch

DEMO_CLASSES = 8
DEMO_IMAGES_PER_CLASS = 24
DEMO_VIEWS = 8
DEMO_NOISE_RATE = 0.25

# (label, TrainConfig overrides): the baseline, each method and plug-in, and combinations.
DEMO_METHODS = (
    ("coop", {}),
    ("dspt", {"method": "dspt"}),
    ("coop+ls", {"targets": "ls"}),
    ("coop+csl(alt)", {"targets": "csl", "alternate": True}),
    ("coop+isl(alt)", {"targets": "isl", "alternate": True}),
    ("coop+prograd", {"prograd": True}),
    ("dspt+isl(alt)+prograd", {"method": "dspt", "targets": "isl", "alternate": True, "prograd": True}),
)


def _random_tiny_checkpoint(path: str) -> str:
    """Save a seeded random-initialised tiny model once, so every run rebuilds the same weights."""
    from safetensors.torch import save

    from fastprompt._io import atomic_write
    from fastprompt.models import TINY_MODEL, create_model
    if not os.path.isfile(path):
        torch.manual_seed(0)
        model = create_model(TINY_MODEL)[0]
        data = save({k: v.contiguous() for k, v in model.state_dict().items()})
        atomic_write(path, lambda f: f.write(data))
    return path


def _train(config, cache, model, tokenizer, run_dir, progress):
    from fastprompt.train import train_run
    try:
        return train_run(config, cache, model, tokenizer, run_dir, resume=True, progress=progress)
    except ValueError as e:
        if "belongs to a different run" not in str(e):
            raise
        shutil.rmtree(run_dir)  # the demo's own folder, from a demo with other settings
        return train_run(config, cache, model, tokenizer, run_dir, progress=progress)


def run_demo(out: str = "demo_runs", *, epochs: int = 40, progress: bool = True) -> int:
    from fastprompt import _backend
    from fastprompt.data import build_or_load_cache, make_shapes_dataset
    from fastprompt.export import export_run
    from fastprompt.models import TINY_MODEL, create_model
    from fastprompt.serve import OnnxClassifier
    from fastprompt.train import TrainConfig

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
        config = TrainConfig(model=TINY_MODEL, pretrained=os.path.abspath(weights), epochs=epochs,
                             **overrides)
        run_dir = os.path.join(out, "runs", label.replace("(", "-").replace(")", ""))
        metrics = _train(config, cache, model, tokenizer, run_dir, progress)
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
        from fastprompt.train import load_run
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
    # --- SoftCPT hook: multi-task section (fastprompt/train/softcpt.py) ---
    from fastprompt.train.softcpt import demo_multitask
    demo_multitask(out, model, preprocess_train, preprocess_val, tokenizer, weights,
                   epochs=epochs, progress=progress)
    # ---
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; everything is in {out}/")
    sys.stdout.flush()
    return 0


def _rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")
