"""Benchmark the exported classifier: images per second of the float32 and int8 ONNX models under
onnxruntime against the torch eager model they came from, and end to end (JPEG decode + Pillow
preprocessing + model, as ``OnnxClassifier`` serves files) against the model alone.

    python bench/bench_export.py                                  # tiny and ViT-B-32, batch 1 and 32
    python bench/bench_export.py --models ViT-B-32 --batch-sizes 1 8 32 --repeats 5

Random weights (nothing is downloaded), 10 classes; model-only rows take random preprocessed
images, end-to-end rows read generated 500 x 375 JPEG files. All sides run in one process at one
thread count (``--threads``, default: the CPUs this process may use, from its affinity mask and
cgroup quota), timed with bench/common.py's ``time_ms`` ``--repeats`` times, interleaved; the
median of the repeats is reported.

CPU timings depend on more than the code, and each results file records it: the CPU model and
the ISA extensions onnxruntime's and torch's kernels dispatch on (AVX2, AVX-512, VNNI, AMX), torch's
BLAS (MKL, which is slow on AMD processors), the load average before and after, and for every row
the CPU share the process obtained while timed (process CPU time / (wall time x threads)). A row
whose share is below 0.8 ran on a busy machine: its thread pool waited for descheduled threads,
which slows a 2-thread onnxruntime or torch run far more than the lost share alone.

On a machine with a GPU and onnxruntime-gpu, the CUDA side runs too: torch eager on the GPU vs
onnxruntime's CUDA provider fed through IOBinding from the same device tensor (TF32 off on both).

Writes bench/results/export-t<threads>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.export import BakedClassifier, bake_classifier, export_onnx  # noqa: E402
from fastprompt.serve.metadata import ModelInfo, read_metadata_props  # noqa: E402
from fastprompt.models.factory import create_model  # noqa: E402
from fastprompt.serve import (CPU, CUDA, OnnxClassifier, available_cpus,  # noqa: E402
                              cpu_description, create_session)

NUM_CLASSES = 10
CONTENDED_SHARE = 0.8
PHOTO_SIZE = (500, 375)  # a typical photo-data-set image (width, height)


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


def photo_files(folder: str, count: int) -> list[str]:
    """``count`` JPEG files of random smooth colour fields (JPEG-compressible, like photos)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
        paths.append(os.path.join(folder, f"{i:03d}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def timed(fn, device: torch.device, min_run_time: float, threads: int) -> tuple[float, float]:
    """(median ms, CPU share obtained while timing) of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    ms = common.time_ms(fn, device, min_run_time=min_run_time)["median_ms"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return ms, cpu / (wall * threads)


def bench_model(name: str, batch_sizes, repeats: int, min_run_time: float, threads: int,
                device: torch.device, folder: str) -> list[dict]:
    model = create_model(name)[0]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(NUM_CLASSES, model.visual.output_dim, generator=g)
    scale = 100.0
    paths = {}
    for precision in ("fp32", "int8") if device.type == "cpu" else ("fp32",):
        out = os.path.join(folder, f"{name}-{precision}")
        export_onnx(model, text, [f"c{i}" for i in range(NUM_CLASSES)], out, scale=scale,
                    model_name=name, seed=0, int8=precision == "int8", min_agreement=0.0)
        paths[precision] = os.path.join(out, "model.onnx")
    info = ModelInfo.from_props(read_metadata_props(paths["fp32"]), paths["fp32"])
    module = BakedClassifier(model.visual, bake_classifier(text, scale)).eval().to(device)
    if device.type == "cuda":
        sessions = {"fp32": create_session(paths["fp32"], info, [(CUDA, {"use_tf32": 0}), CPU])}
    else:
        sessions = {p: create_session(path, info, [CPU], intra_op_num_threads=threads)
                    for p, path in paths.items()}
        classifiers = {p: OnnxClassifier(path, [CPU], batch_size=max(batch_sizes),
                                         intra_op_num_threads=threads) for p, path in paths.items()}
        files = photo_files(os.path.join(folder, "photos"), max(batch_sizes))
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, 3, *info.image_size, generator=g).to(device)
        sides = {"torch eager": torch_side(module, x)}
        for p, session in sessions.items():
            side = ort_cuda_side if device.type == "cuda" else ort_cpu_side
            sides[f"onnxruntime {p}"] = side(session, x)
        if device.type == "cpu":
            pre = classifiers["fp32"].preprocessor
            sides["decode + preprocess"] = lambda batch=files[:b]: pre(batch)
            for p, clf in classifiers.items():
                sides[f"end to end {p}"] = lambda clf=clf, batch=files[:b]: clf.predict_proba(batch)
        load_before = os.getloadavg()[0]
        times = {k: [] for k in sides}
        shares = {k: [] for k in sides}
        for _ in range(repeats):  # interleaved, so drifting load hits every side alike
            for k, fn in sides.items():
                ms, share = timed(fn, device, min_run_time, threads)
                times[k].append(ms)
                shares[k].append(share)
        torch_ms = statistics.median(times["torch eager"])
        fp32_ms = statistics.median(times["onnxruntime fp32"])
        for k in sides:
            ms = statistics.median(times[k])
            rows.append({"model": name, "batch": b, "backend": k, "median_ms": ms,
                         "repeat_medians_ms": times[k], "images_per_s": 1e3 * b / ms,
                         "cpu_share": statistics.median(shares[k]) if device.type == "cpu" else None,
                         "vs_torch": torch_ms / ms if k.startswith("onnxruntime") else None,
                         # int8 model and end-to-end rows against the float32 model alone
                         "vs_model_fp32": (fp32_ms / ms if k == "onnxruntime int8"
                                           or k.startswith("end to end") else None),
                         "onnx_bytes": os.path.getsize(paths[k.split()[-1]]) if k.split()[-1] in paths else None,
                         "load_average_1m": [load_before, os.getloadavg()[0]],
                         "device_type": device.type})
            r = rows[-1]
            share = f", CPU share {r['cpu_share']:.2f}" if r["cpu_share"] is not None else ""
            print(f"{name:16s} {device.type} batch {b:3d} {k:20s} {r['images_per_s']:9.1f} img/s"
                  f"{share}", flush=True)
    return rows


def torch_blas() -> str:
    import re
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def render(env: dict, rows: list[dict]) -> str:
    """The markdown results: the machine and its load, then one row per measurement."""
    cpu, load = env["cpu"], (env["load_average_start"][0], env["load_average_end"][0])
    threads = env["ort_intra_op_threads"]
    text = (f"{cpu['model']}, ISA {' '.join(cpu['isa']) or 'baseline x86-64'}, "
            f"{cpu['available_cpus']} of {cpu['logical_cpus']} CPUs available, {threads} threads; "
            f"torch {env['torch']} ({env['torch_blas']}, {env['torch_cpu_capability']}), onnxruntime "
            f"{env['onnxruntime']}; load average {load[0]:.2f} at the start, {load[1]:.2f} at the "
            f"end; {env['timestamp']}\n\n")
    text += common.markdown_table(
        ["model", "batch", "backend", "median ms", "images/s", "vs torch eager",
         "vs onnxruntime fp32 model alone", "CPU share"],
        [[r["model"], r["batch"], r["backend"], f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}",
          f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "",
          f"{r['vs_model_fp32']:.2f}x" if r["vs_model_fp32"] else "",
          f"{r['cpu_share']:.2f}" if r["cpu_share"] is not None else ""]
         for r in rows])
    contended = [r for r in rows if r["cpu_share"] is not None and r["cpu_share"] < CONTENDED_SHARE]
    if contended:
        text += (f"\n\n{len(contended)} of {len(rows)} rows obtained less than {CONTENDED_SHARE} of "
                 f"{threads} CPUs (other work on the machine): their absolute numbers are low, "
                 "ratios between interleaved rows hold better.")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite the markdown table of an earlier results file")
    parser.add_argument("--threads", type=int, default=available_cpus(),
                        help="torch and onnxruntime threads (default: the CPUs this process may "
                             "use, %(default)s)")
    args = parser.parse_args(argv)
    if args.render:
        import json
        with open(args.render, encoding="utf-8") as f:
            saved = json.load(f)
        env, rows = saved["environment"], saved["results"]
        table = render(env, rows)
        print(table)
        print("wrote", common.write_results(f"export-t{env['threads']}", env, rows, table))
        return
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and CUDA in ort.get_available_providers():
        devices.append(torch.device("cuda"))
    with tempfile.TemporaryDirectory() as folder:
        for device in devices:
            load_start = os.getloadavg()
            rows = []
            for name in args.models:
                rows += bench_model(name, args.batch_sizes, args.repeats, args.min_run_time,
                                    args.threads, device, folder)
            env = common.environment(device)
            env.update({"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                        "open_clip": open_clip.__version__, "fastprompt": fastprompt.__version__,
                        "cpu": cpu_description(),
                        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "torch_blas": torch_blas(),
                        "ort_intra_op_threads": args.threads if device.type == "cpu" else None,
                        "repeats": args.repeats, "min_run_time_s": args.min_run_time,
                        "num_classes": NUM_CLASSES, "weights": "random",
                        "photo_size": PHOTO_SIZE,
                        # other work on the machine skews CPU timings: record how busy it was
                        "load_average_start": load_start, "load_average_end": os.getloadavg()})
            table = render(env, rows)
            print(table)
            print("wrote", common.write_results(f"export-t{args.threads}", env, rows, table))


if __name__ == "__main__":
    main()
