"""``fastprompt export``: a trained run as an ONNX classifier (and an NVIDIA Triton Inference
Server model repository), checked against torch before it is put in place; ``--int8`` and
``--fp16`` exports are also compared with the float32 export and refused below
``--min-agreement``."""
from __future__ import annotations

import argparse
import sys

from fastprompt.cli.common import seed
from fastprompt.cli.dassl import add_export_args, cmd_export_dassl
from fastprompt.cli.types import number_between
from fastprompt.export.agreement import EvaluationSet
from fastprompt.export.triton import TritonSettings
from fastprompt.pipeline import agreement_set, export_run, export_run_ensemble
from fastprompt.train.transfer import read_classnames_file

DEFAULT_AGREEMENT_LIMIT = 512


def cmd_export(args: argparse.Namespace) -> None:
    if args.dassl:  # the official code's checkpoint instead of an ONNX model
        cmd_export_dassl(args)
        return
    report = _export_ensemble(args) if args.triton_ensemble else _export_one(args)
    print(report.summary())


def _triton_settings(args: argparse.Namespace, *, ensemble: bool = False) -> TritonSettings:
    """The ``--triton-*`` options as ``TritonSettings`` (the ensemble names its models itself and
    has no TensorRT option)."""
    names = {} if ensemble else {"name": args.triton_name, "tensorrt": args.triton_tensorrt}
    return TritonSettings(max_batch_size=args.triton_max_batch_size, gpu=args.triton_gpu,
                          instances=args.triton_instances,
                          queue_delay_us=args.triton_queue_delay_us, **names)


def _export_one(args: argparse.Namespace):
    triton = _triton_settings(args)
    evaluation = None
    if args.int8 or args.fp16:
        if args.agreement_limit < 0:
            raise ValueError(f"--agreement-limit: expected an int >= 0, got {args.agreement_limit}")
        evaluation, note = agreement_set(args.run_dir, args.task, args.head_only,
                                         args.agreement_limit)
        if note is not None:
            print(f"fastprompt export: note: {note}", file=sys.stderr)
    classnames = None
    if args.classnames is not None:
        classnames = read_classnames_file(args.classnames)
        if evaluation is not None:  # the run's labels name its own classes, not these
            evaluation = EvaluationSet(evaluation.inputs, None,
                                       f"{evaluation.source} (unlabelled: other class names)")
    return export_run(args.run_dir, args.out_dir, head_only=args.head_only, fp16=args.fp16,
                      int8=args.int8, min_agreement=args.min_agreement, evaluation=evaluation,
                      triton=triton, opset=args.opset, seed=args.seed,
                      verify=not args.no_verify, task=args.task, classnames=classnames,
                      classnames_from=f"--classnames: {args.classnames}")


def _export_ensemble(args: argparse.Namespace):
    for flag in ("fp16", "int8", "head_only", "triton_tensorrt"):
        if getattr(args, flag):
            raise ValueError(f"--triton-ensemble: exports every task in float32 with images as "
                             f"input; drop --{flag.replace('_', '-')}")
    if args.task is not None:
        raise ValueError("--triton-ensemble: exports every task; drop --task")
    if args.classnames is not None:
        raise ValueError("--triton-ensemble: exports every task with its own class names; drop "
                         "--classnames")
    return export_run_ensemble(args.run_dir, args.out_dir,
                               triton=_triton_settings(args, ensemble=True),
                               verify=not args.no_verify, opset=args.opset, seed=args.seed)


COMMANDS = ("export",)


def add_commands(subparsers) -> None:
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
    parser.add_argument("--min-agreement", type=number_between(0, 1), default=0.99,
                        metavar="FRACTION",
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
    parser.add_argument("--seed", type=seed, default=None, help="seed of the verification inputs")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the onnxruntime-vs-torch check (not recommended)")
    parser.add_argument("--task", metavar="NAME", default=None,
                        help="SoftCPT runs: the task whose classifier to export")
    parser.add_argument("--classnames", metavar="FILE", default=None,
                        help="classify among these class names (one per line) instead of the "
                             "trained ones, with the learned context in front of each (not for "
                             "class-specific contexts)")
    add_export_args(parser)
    parser.set_defaults(func=cmd_export)
