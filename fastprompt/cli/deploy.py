"""``fastprompt export`` and ``fastprompt predict``: their arguments and commands.

Each ``add_*_parser`` registers a sub-command whose ``func`` default takes the parsed arguments
and returns the exit code: 0 on success, 2 for bad input (a message naming the file or argument
on stderr), 1 when an export fails its own verification.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_commands(subparsers) -> None:
    """Register export and predict on the ``fastprompt`` sub-parsers."""
    add_export_parser(subparsers)
    add_predict_parser(subparsers)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a trained run as an ONNX classifier (and a Triton model repository)",
        description="Bake the learned prompts' class embeddings into the image tower and write "
                    "OUT_DIR/model.onnx plus OUT_DIR/<triton-name>/ for NVIDIA Triton Inference "
                    "Server. The export is checked against torch with onnxruntime before it is "
                    "put in place.")
    parser.add_argument("run_dir", help="training run folder")
    parser.add_argument("out_dir", help="export folder (created if missing)")
    parser.add_argument("--head-only", action="store_true",
                        help="graph from image features (batch x D) instead of images")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 weights and compute for GPU serving (float32 inputs/outputs)")
    parser.add_argument("--triton-name", default="fastprompt_classifier",
                        help="model name in the Triton repository (default: %(default)s)")
    parser.add_argument("--triton-max-batch-size", type=int, default=64,
                        help="max_batch_size of the Triton config (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the verification inputs")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime-vs-torch check (not recommended)")
    parser.add_argument("--task", metavar="NAME", default=None,
                        help="SoftCPT runs: the task whose classifier to export")
    parser.set_defaults(func=run_export)
    return parser


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="classify images with an exported ONNX model",
        description="Print the top-k classes of each image, using onnxruntime (CUDA when "
                    "onnxruntime-gpu and a GPU are present, else the CPU).")
    parser.add_argument("model", help="model.onnx written by `fastprompt export`, or its folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per onnxruntime call (default: %(default)s)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="execution provider (default: %(default)s)")
    parser.set_defaults(func=run_predict)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from fastprompt.export.onnx_export import ExportVerificationError, export_run
    try:
        report = export_run(args.run_dir, args.out_dir, head_only=args.head_only, fp16=args.fp16,
                            triton_name=args.triton_name,
                            triton_max_batch_size=args.triton_max_batch_size, opset=args.opset,
                            seed=args.seed, verify=not args.no_verify, task=args.task)
    except ExportVerificationError as e:
        print(f"fastprompt export: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastprompt export: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"fastprompt export: error: cannot load the training run ({e})", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from fastprompt.serve import CPU, CUDA, OnnxClassifier
    providers = {"auto": None, "cpu": [CPU], "cuda": [CUDA, CPU]}[args.provider]
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k: expected an int >= 1, got {args.top_k}")
        classifier = OnnxClassifier(args.model, providers, batch_size=args.batch_size)
        predictions = classifier.predict(args.images, top_k=args.top_k)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"fastprompt predict: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": image, "top_k": [{"class": c, "prob": p} for c, p in top]}
                          for image, top in zip(args.images, predictions)], ensure_ascii=False))
    else:
        for image, top in zip(args.images, predictions):
            print(image)
            for c, p in top:
                print(f"  {p:.4f}  {c}")
    return 0
