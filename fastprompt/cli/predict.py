"""``fastprompt predict``: classify images with an exported ONNX model.

Needs onnxruntime, numpy and Pillow only (``pip install fastprompt[serve]``): this module and
what it imports never load torch, so ``fastprompt predict`` runs where torch is not installed.

Image file names and the class names of a model file are untrusted: the text output shows their
non-printable characters escaped (``fastprompt._checks.printable``), so an ESC sequence cannot
act on the terminal and a newline cannot forge a line; ``--json``/``--jsonl`` are JSON-escaped.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastprompt._checks import printable
from fastprompt._io import Progress
from fastprompt.cli import PartlyFailed
from fastprompt.cli.types import int_at_least
from fastprompt.serve import CPU, CUDA, OnnxClassifier, list_images, read_image_list


def cmd_predict(args: argparse.Namespace) -> None:
    providers = {"auto": None, "cpu": [CPU], "cuda": [CUDA, CPU]}[args.provider]
    failed = 0
    if args.top_k < 1:
        raise ValueError(f"--top-k: expected an int >= 1, got {args.top_k}")
    sources = list(args.images) + (read_image_list(args.list_file) if args.list_file else [])
    if not sources:
        raise ValueError("images: name image files or folders, or --list FILE")
    paths = list_images(sources)
    classifier = OnnxClassifier(args.model, providers, batch_size=args.batch_size)
    tty = sys.stderr.isatty()
    results = []
    with Progress(len(paths), "predict", "images", rate="img/s", redraw=tty,
                  enabled=tty if args.progress is None else args.progress) as progress:
        for image, top, error in classifier.iter_predict(paths, top_k=args.top_k,
                                                         skip_unreadable=args.skip_unreadable):
            progress.update()
            failed += error is not None
            entry = ({"image": image, "error": error} if error is not None else
                     {"image": image, "top_k": [{"class": c, "prob": p} for c, p in top]})
            if args.jsonl:
                print(json.dumps(entry, ensure_ascii=False), flush=True)
            elif args.json:
                results.append(entry)
            elif error is not None:
                print(f"{printable(str(image))}\n  error: {printable(error)}")
            else:
                print(printable(str(image)))
                for c, p in top:
                    print(f"  {p:.4f}  {printable(c)}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    if failed:
        raise PartlyFailed(f"{failed} of {len(paths)} images could not be read")


COMMANDS = ("predict",)


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images with an exported ONNX model",
        description="Print the top-k classes of each image, using onnxruntime (CUDA when "
                    "onnxruntime-gpu and a GPU are present, else the CPU). Folders are searched "
                    "for image files; --jsonl streams one JSON object per image as results come.")
    parser.add_argument("model", help="model.onnx written by `fastprompt export`, or its folder")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files or folders (searched recursively, sorted)")
    parser.add_argument("--list", metavar="FILE", dest="list_file",
                        help="a file naming images, one path per line (# comments allowed)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: %(default)s)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    output.add_argument("--jsonl", action="store_true",
                        help="stream JSON lines, one per image, in input order")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32,
                        help="images per onnxruntime call (default: %(default)s)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="execution provider (default: %(default)s)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="report an unreadable image (an \"error\" entry) and go on, instead "
                             "of stopping")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=cmd_predict)
