"""``fastprompt export`` and ``fastprompt predict``: their arguments and commands.

Each ``add_*_parser`` registers a sub-command whose ``func`` default takes the parsed arguments
and returns the exit code: 0 on success, 2 for bad input (a message naming the file or argument
on stderr), 1 when an export fails its own verification or agreement check.

``predict`` imports onnxruntime, numpy and Pillow only (``fastprompt[serve]``); ``export`` needs
the ``train`` extra. This module is imported for every command, so both import their libraries
inside their functions: the export side (torch, open_clip, onnx) so that ``predict`` and the
other commands do not load it, ``fastprompt.serve`` (onnxruntime, not part of the ``train``
extra) so that the training commands do not need it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from fastprompt._io import Progress

DEFAULT_AGREEMENT_LIMIT = 512


COMMANDS = ("export", "predict")


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
                    "put in place; --int8 and --fp16 exports are also compared with the float32 "
                    "export (OUT_DIR/agreement.json) and refused below --min-agreement.")
    parser.add_argument("run_dir", help="training run folder")
    parser.add_argument("out_dir", help="export folder (created if missing)")
    parser.add_argument("--head-only", action="store_true",
                        help="graph from image features (batch x D) instead of images")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="fp16 weights and compute for GPU serving (float32 inputs/outputs)")
    precision.add_argument("--int8", action="store_true",
                           help="dynamic int8 quantisation of the image tower's weight products "
                                "for CPU serving (the class head stays float32)")
    parser.add_argument("--min-agreement", type=float, default=0.99, metavar="FRACTION",
                        help="refuse an --int8/--fp16 export whose top-1 agreement with the "
                             "float32 export is lower (default: %(default)s)")
    parser.add_argument("--agreement-limit", type=int, default=DEFAULT_AGREEMENT_LIMIT, metavar="N",
                        help="test images of the run's cache used for the agreement report, "
                             "spread over the test set; 0 = all (default: %(default)s)")
    parser.add_argument("--triton-name", default="fastprompt_classifier",
                        help="model name in the Triton repository (default: %(default)s)")
    parser.add_argument("--triton-max-batch-size", type=int, default=64,
                        help="max_batch_size of the Triton config (default: %(default)s)")
    parser.add_argument("--triton-gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="KIND_GPU instances in the Triton config (default: with --fp16)")
    parser.add_argument("--triton-instances", type=int, default=None, metavar="N",
                        help="model instances per device (default: 2 per GPU, 1 on the CPU)")
    parser.add_argument("--triton-tensorrt", action="store_true",
                        help="ask Triton's onnxruntime backend for its TensorRT accelerator "
                             "(GPU instances; FP16 precision with --fp16)")
    parser.add_argument("--triton-queue-delay-us", type=int, default=100, metavar="US",
                        help="dynamic batching: longest wait to form a batch (default: %(default)s)")
    parser.add_argument("--triton-ensemble", action="store_true",
                        help="SoftCPT runs: one shared image encoder, one head per task and one "
                             "ensemble per task in OUT_DIR (every task; float32)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the verification inputs")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime-vs-torch check (not recommended)")
    parser.add_argument("--task", metavar="NAME", default=None,
                        help="SoftCPT runs: the task whose classifier to export")
    parser.add_argument("--classnames", metavar="FILE", default=None,
                        help="classify among these class names (one per line) instead of the "
                             "trained ones, with the learned context in front of each (not for "
                             "class-specific contexts)")
    parser.set_defaults(func=run_export)
    return parser


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
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
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per onnxruntime call (default: %(default)s)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="execution provider (default: %(default)s)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="report an unreadable image (an \"error\" entry) and go on, instead "
                             "of stopping")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=run_predict)
    return parser


# ---------------------------------------------------------------------------------------------
# export


def run_export(args: argparse.Namespace) -> int:
    # The export side imports torch: inside the export functions (see the module docstring).
    from fastprompt.export.agreement import AgreementError
    from fastprompt.export.verify import ExportVerificationError
    try:
        if args.triton_ensemble:
            report = _export_ensemble(args)
        else:
            report = _export_one(args)
    except (ExportVerificationError, AgreementError) as e:
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


def _triton_settings(args: argparse.Namespace, *, ensemble: bool = False):
    """The ``--triton-*`` options as ``TritonSettings`` (the ensemble names its models itself and
    has no TensorRT option)."""
    from fastprompt.export.triton import TritonSettings  # onnx: the export side (see above)
    names = {} if ensemble else {"name": args.triton_name, "tensorrt": args.triton_tensorrt}
    return TritonSettings(max_batch_size=args.triton_max_batch_size, gpu=args.triton_gpu,
                          instances=args.triton_instances,
                          queue_delay_us=args.triton_queue_delay_us, **names)


def _export_one(args: argparse.Namespace):
    # The export side imports torch: inside the export functions (see the module docstring).
    from fastprompt.export.agreement import EvaluationSet
    from fastprompt.pipeline import export_run
    from fastprompt.train.transfer import read_classnames_file
    evaluation = None
    if args.int8 or args.fp16:
        if args.agreement_limit < 0:
            raise ValueError(f"--agreement-limit: expected an int >= 0, got {args.agreement_limit}")
        evaluation = evaluation_set(args.run_dir, args.task, args.head_only, args.agreement_limit)
    classnames = None
    if args.classnames is not None:
        classnames = read_classnames_file(args.classnames)
        if evaluation is not None:  # the run's labels name its own classes, not these
            evaluation = EvaluationSet(evaluation.inputs, None,
                                       f"{evaluation.source} (unlabelled: other class names)")
    return export_run(args.run_dir, args.out_dir, head_only=args.head_only, fp16=args.fp16,
                      int8=args.int8, min_agreement=args.min_agreement, evaluation=evaluation,
                      triton=_triton_settings(args), opset=args.opset, seed=args.seed,
                      verify=not args.no_verify, task=args.task, classnames=classnames)


def _export_ensemble(args: argparse.Namespace):
    # The export side imports torch: inside the export functions (see the module docstring).
    from fastprompt.export.ensemble import export_ensemble
    from fastprompt.train import load_softcpt_run
    for flag in ("fp16", "int8", "head_only", "triton_tensorrt"):
        if getattr(args, flag):
            raise ValueError(f"--triton-ensemble: exports every task in float32 with images as "
                             f"input; drop --{flag.replace('_', '-')}")
    if args.task is not None:
        raise ValueError("--triton-ensemble: exports every task; drop --task")
    if args.classnames is not None:
        raise ValueError("--triton-ensemble: exports every task with its own class names; drop "
                         "--classnames")
    names = [t["name"] for t in _run_metrics(args.run_dir).get("tasks", [])]
    if not names:
        raise ValueError(f"--triton-ensemble: {args.run_dir} is not a finished SoftCPT run "
                         "(its metrics.json lists no tasks)")
    runs = {name: load_softcpt_run(args.run_dir, task=name) for name in names}
    first = runs[names[0]]
    return export_ensemble(
        first.model, {name: (run.text_features, list(run.class_names)) for name, run in runs.items()},
        args.out_dir, scale=float(first.scale), model_name=first.model_name,
        method={k: v for k, v in first.method.items() if k != "task"},
        triton=_triton_settings(args, ensemble=True), verify=not args.no_verify, opset=args.opset,
        seed=args.seed)


def _run_metrics(run_dir: str) -> dict:
    from fastprompt.train.files import METRICS  # fastprompt.train imports torch (see above)
    path = os.path.join(run_dir, METRICS)
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"run: cannot read {path} ({e})") from None
    return metrics if isinstance(metrics, dict) else {}


def evaluation_set(run_dir: str, task: str | None, head_only: bool, limit: int):
    """The run's own test data for the agreement report: its feature cache's test images (or,
    head-only, test features) with their labels, at most ``limit`` of them spread evenly over the
    test set (0: all). None, with a note on stderr, when the cache is gone or has no test split:
    the export then compares on random inputs."""
    # The export side imports torch: inside the export functions (see the module docstring).
    from fastprompt.data import load_cache
    from fastprompt.export.agreement import EvaluationSet
    metrics = _run_metrics(run_dir)
    entry = metrics
    if task is not None:
        key = task.casefold()
        entry = next((t for t in metrics.get("tasks", []) if str(t.get("name", "")).casefold() == key),
                     {})
    path = (entry.get("cache") or {}).get("path")
    if not path or not os.path.isfile(path):
        print(f"fastprompt export: note: the run's feature cache ({path or 'not recorded'}) is not "
              "here; the agreement report uses random inputs", file=sys.stderr)
        return None
    cache = load_cache(path)
    n = len(cache.test_labels)
    if n == 0:
        print(f"fastprompt export: note: {path} has no test split; the agreement report uses "
              "random inputs", file=sys.stderr)
        return None
    rows = np.arange(n) if limit == 0 or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)
    labels = cache.test_labels.numpy()[rows]
    if head_only:
        inputs = cache.test_features.float().numpy()[rows]
        return EvaluationSet(inputs, labels, f"test features of {path}")
    paths = [cache.test_paths[i] for i in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"fastprompt export: note: {len(missing)} of the cache's test images are gone (e.g. "
              f"{missing[0]}); the agreement report uses random inputs", file=sys.stderr)
        return None
    return EvaluationSet(paths, labels, f"test images of {path}")


# ---------------------------------------------------------------------------------------------
# predict (onnxruntime, numpy and Pillow only)


def run_predict(args: argparse.Namespace) -> int:
    # onnxruntime only here: the train extra does not install it (see the module docstring).
    from fastprompt.serve import CPU, CUDA, OnnxClassifier, list_images, read_image_list
    providers = {"auto": None, "cpu": [CPU], "cuda": [CUDA, CPU]}[args.provider]
    failed = 0
    try:
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
                    print(f"{image}\n  error: {error}")
                else:
                    print(image)
                    for c, p in top:
                        print(f"  {p:.4f}  {c}")
        if args.json:
            print(json.dumps(results, ensure_ascii=False))
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"fastprompt predict: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"fastprompt predict: {failed} of {len(paths)} images could not be read",
              file=sys.stderr)
        return 1
    return 0
