"""Benchmark the exported classifier: images per second through onnxruntime vs the torch eager
model it was exported from (the same image tower, normalisation and baked head).

    python bench/bench_export.py                                  # tiny and ViT-B-32, batch 1 and 32
    python bench/bench_export.py --models ViT-B-32 --batch-sizes 1 8 32 --repeats 5

Random weights (nothing is downloaded), random preprocessed images, 10 classes. Both sides run in
the same process at the same thread count (torch.set_num_threads / intra_op_num_threads), and are
timed with bench/common.py's ``time_ms`` (CPU: torch.utils.benchmark, median) ``--repeats``
times, interleaved; the median of the repeats is reported. On a machine with a GPU and
onnxruntime-gpu, the CUDA side runs too: torch eager on the GPU vs onnxruntime's CUDA provider fed
through IOBinding from the same device tensor (TF32 off on both sides).

Writes bench/results/export-t<threads>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.export import BakedClassifier, bake_classifier, export_onnx  # noqa: E402
from fastprompt.export.metadata import ModelInfo, read_metadata_props  # noqa: E402
from fastprompt.serve import CPU, CUDA, create_session  # noqa: E402
from fastprompt.models.factory import create_model  # noqa: E402

NUM_CLASSES = 10


def torch_side(module, x):
    def run():
        with torch.inference_mode():
            return module(x)
    return run


def ort_cpu_side(session, x):
    feed = {"image": x.numpy()}
    return lambda: session.run(["logits", "probs"], feed)


def ort_cuda_side(session, x):
    """IOBinding: the input is read in place from the torch tensor, outputs stay on the GPU."""
    binding = session.io_binding()
    binding.bind_input("image", "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output("logits", "cuda")
    binding.bind_output("probs", "cuda")

    def run():
        torch.cuda.current_stream().synchronize()  # onnxruntime runs on its own stream
        session.run_with_iobinding(binding)
    return run


def bench_model(name: str, batch_sizes, repeats: int, min_run_time: float, threads: int,
                device: torch.device, folder: str) -> list[dict]:
    model = create_model(name)[0]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(NUM_CLASSES, model.visual.output_dim, generator=g)
    scale = 100.0
    out = os.path.join(folder, name)
    export_onnx(model, text, [f"c{i}" for i in range(NUM_CLASSES)], out, scale=scale,
                model_name=name, seed=0)
    path = os.path.join(out, "model.onnx")
    info = ModelInfo.from_props(read_metadata_props(path), path)
    module = BakedClassifier(model.visual, bake_classifier(text, scale)).eval().to(device)
    if device.type == "cuda":
        session = create_session(path, info, [(CUDA, {"use_tf32": 0}), CPU])
    else:
        session = create_session(path, info, [CPU], intra_op_num_threads=threads)
    size = os.path.getsize(path)
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, 3, *info.image_size, generator=g).to(device)
        sides = {"torch eager": torch_side(module, x),
                 "onnxruntime": (ort_cuda_side if device.type == "cuda" else ort_cpu_side)(session, x)}
        times = {k: [] for k in sides}
        for _ in range(repeats):  # interleaved, so drifting load hits both sides alike
            for k, fn in sides.items():
                times[k].append(common.time_ms(fn, device, min_run_time=min_run_time)["median_ms"])
        for k in sides:
            ms = statistics.median(times[k])
            rows.append({"model": name, "batch": b, "backend": k, "median_ms": ms,
                         "repeat_medians_ms": times[k], "images_per_s": 1e3 * b / ms,
                         "onnx_bytes": size, "device_type": device.type})
        ratio = statistics.median(times["torch eager"]) / statistics.median(times["onnxruntime"])
        rows[-2]["speedup_vs_torch"], rows[-1]["speedup_vs_torch"] = None, ratio
        print(f"{name:16s} {device.type} batch {b:3d}: torch {rows[-2]['images_per_s']:9.1f} img/s, "
              f"onnxruntime {rows[-1]['images_per_s']:9.1f} img/s ({ratio:.2f}x)", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and CUDA in ort.get_available_providers():
        devices.append(torch.device("cuda"))
    with tempfile.TemporaryDirectory() as folder:
        for device in devices:
            rows = []
            for name in args.models:
                rows += bench_model(name, args.batch_sizes, args.repeats, args.min_run_time,
                                    args.threads, device, folder)
            env = common.environment(device)
            env.update({"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                        "open_clip": open_clip.__version__, "fastprompt": fastprompt.__version__,
                        "ort_intra_op_threads": args.threads if device.type == "cpu" else None,
                        "repeats": args.repeats, "min_run_time_s": args.min_run_time,
                        "num_classes": NUM_CLASSES, "weights": "random",
                        # other work on the machine skews CPU timings: record how busy it was
                        "load_average_1m": os.getloadavg()[0]})
            table = common.markdown_table(
                ["model", "batch", "backend", "median ms", "images/s", "onnxruntime vs torch"],
                [[r["model"], r["batch"], r["backend"], f"{r['median_ms']:.2f}",
                  f"{r['images_per_s']:.1f}",
                  f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else ""]
                 for r in rows])
            print(table)
            print("wrote", common.write_results(f"export-t{args.threads}", env, rows, table))


if __name__ == "__main__":
    main()
