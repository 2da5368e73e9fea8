"""Benchmark what serving a CoCoOp classifier costs against a CoOp one: the exported ONNX graphs
under onnxruntime (CPU), per image.

    python bench/bench_export_cocoop.py --threads 2
    python bench/bench_export_cocoop.py --models ViT-B-16 --classes 10 100 --batch-sizes 1 8

CoOp's export is the image tower and a fixed class head (one product with baked class
embeddings). CoCoOp's prompts depend on the image, so its graph holds the text tower: each image
adds C prompts of (truncated) text-tower work on top of its image tower. The rows give both
graphs' milliseconds per image and their ratio, with the image tower alone for scale (CoOp's
head is negligible), at each class count and batch size.

Random weights (nothing is downloaded). Both graphs come from one model and run in one process,
interleaved, at one thread count; medians of ``--repeats``. Writes
bench/results/export_cocoop-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from fastprompt.export import export_onnx  # noqa: E402
from fastprompt.models.factory import create_model  # noqa: E402
from fastprompt.serve import CPU, create_session  # noqa: E402
from fastprompt.serve.metadata import ModelInfo, read_metadata_props  # noqa: E402
from fastprompt.train.cocoop import CoCoOpHead, ConditionalPrompts, cocoop_meta_net  # noqa: E402
from fastprompt.train.config import TrainConfig  # noqa: E402
from fastprompt.train.coop import prompted_model  # noqa: E402


def export_pair(name: str, classes: int, folder: str) -> dict[str, str]:
    """``{"coop": path, "cocoop": path}``: the two exported graphs of one random model."""
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(name)
    classnames = [f"class number {i}" for i in range(classes)]
    config = TrainConfig.for_learner("cocoop", model=name)
    prompted = prompted_model(model, tokenizer, classnames, config)
    meta_net = cocoop_meta_net(model.visual.output_dim, prompted.text_encoder.width)
    scale = 100.0
    head = CoCoOpHead(ConditionalPrompts(prompted, meta_net).eval(), scale).for_export()
    with torch.no_grad():
        text = prompted().float()
    paths = {}
    for learner, text_head in (("coop", None), ("cocoop", head)):
        out = os.path.join(folder, f"{name}-c{classes}-{learner}")
        export_onnx(model, text, classnames, out, scale=scale, model_name=name, seed=0,
                    text_head=text_head, method={"name": learner})
        paths[learner] = os.path.join(out, "model.onnx")
    return paths


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-16"])
    p.add_argument("--classes", nargs="+", type=int, default=[10, 100])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    env = common.environment(device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for classes in args.classes:
                paths = export_pair(name, classes, folder)
                info = ModelInfo.from_props(read_metadata_props(paths["coop"]), paths["coop"])
                sessions = {k: create_session(v, info, [CPU], intra_op_num_threads=threads)
                            for k, v in paths.items()}
                for b in args.batch_sizes:
                    x = torch.randn(b, 3, *info.image_size).numpy()
                    sides = {k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()}
                    times = {k: [] for k in sides}
                    for _ in range(args.repeats):  # interleaved
                        for k, fn in sides.items():
                            times[k].append(common.time_ms(fn, device, args.min_run_time)["median_ms"])
                    coop, cocoop = (statistics.median(times[k]) for k in ("coop", "cocoop"))
                    row = {"model": name, "classes": classes, "batch": b,
                           "coop_ms_per_image": coop / b, "cocoop_ms_per_image": cocoop / b,
                           "cocoop_vs_coop": cocoop / coop, "repeat_medians_ms": times,
                           "onnx_bytes": {k: os.path.getsize(v) for k, v in paths.items()}}
                    rows.append(row)
                    print(f"{name:16s} C={classes:4d} batch {b:3d}: CoOp {row['coop_ms_per_image']:.2f} "
                          f"ms/img, CoCoOp {row['cocoop_ms_per_image']:.2f} ms/img "
                          f"({row['cocoop_vs_coop']:.1f}x)", flush=True)
    env["threads"] = threads
    env["load_average_end"] = list(os.getloadavg())
    table = (f"{env['cpu_model']}, {threads} threads, onnxruntime CPU; load average "
             f"{env['load_average_end'][0]:.2f} at the end; {env['timestamp']}\n\n")
    table += common.markdown_table(
        ["model", "classes", "batch", "CoOp ms/image", "CoCoOp ms/image", "CoCoOp / CoOp"],
        [[r["model"], r["classes"], r["batch"], f"{r['coop_ms_per_image']:.2f}",
          f"{r['cocoop_ms_per_image']:.2f}", f"{r['cocoop_vs_coop']:.1f}x"] for r in rows])
    print(common.write_results("export_cocoop", env, rows, table))
    return rows


if __name__ == "__main__":
    main()
