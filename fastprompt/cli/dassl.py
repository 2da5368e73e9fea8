"""``fastprompt import-dassl``: a checkpoint of the papers' own code (Dassl's
``prompt_learner/model.pth.tar-N``) as a run folder; and ``fastprompt export RUN OUT --dassl``,
the reverse (registered by ``cli/deploy.py``, carried out here)."""
from __future__ import annotations

import argparse
import sys

from fastprompt.cli import common
from fastprompt.models import CLASS_TOKEN_POSITIONS
from fastprompt.train.dassl import PRECISIONS, export_dassl, import_dassl, official_learners
from fastprompt.train.transfer import read_classnames_file


def cmd_import_dassl(args: argparse.Namespace) -> None:
    names = read_classnames_file(args.classnames)
    metrics = import_dassl(args.checkpoint, args.learner, names, args.out, model=args.model,
                           pretrained=args.pretrained,
                           device=common.device(args.device or "cpu"),
                           class_token_position=args.class_token_position,
                           kg_template=args.kg_template)
    source = metrics["imported_from"]
    if source["token_suffix"] not in ("matches", "absent"):
        print(f"fastprompt import-dassl: note: the checkpoint's token_suffix (the class-name "
              f"tokens the official code saved, which it ignores on load, as this import does) "
              f"{source['token_suffix']} from the prompts built here: check that --classnames "
              "lists the classes in the trained order and that --model is the one it was "
              "trained with (TCP's official prompts also add a phrase per data set, such as "
              "', a type of pet.', which fastprompt's TCP does not)", file=sys.stderr)
    config = metrics["config"]
    shape = ("class-specific " if config["class_specific"] else "") + f"{config['n_ctx']} tokens"
    ignored = ", ".join(source["ignored"]) or "nothing"
    print(f"imported a {source['trainer']} prompt learner ({shape}, {source['dtype']}, epoch "
          f"{source['epoch']}) for {metrics['num_classes']} classes from {source['path']} into "
          f"{args.out} (ignored: {ignored})")


def cmd_export_dassl(args: argparse.Namespace) -> None:
    """``fastprompt export RUN OUT --dassl``: refuses the options of ONNX exports."""
    for flag in ("fp16", "int8", "head_only", "triton_ensemble", "triton_tensorrt", "no_verify"):
        if getattr(args, flag, False):
            raise ValueError(f"--dassl: writes the official code's checkpoint, not an ONNX "
                             f"model; drop --{flag.replace('_', '-')}")
    for option in ("task", "classnames"):
        if getattr(args, option, None) is not None:
            raise ValueError(f"--dassl: writes the run's own classifier; drop --{option}")
    report = export_dassl(args.run_dir, args.out_dir, precision=args.dassl_precision)
    for note in report.notes:
        print(f"fastprompt export: note: {note}", file=sys.stderr)
    print(report.summary())


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """``export``'s ``--dassl`` options."""
    parser.add_argument("--dassl", action="store_true",
                        help="write OUT_DIR/prompt_learner/model.pth.tar-N, the checkpoint the "
                             "official code (CoOp, ProGrad, KgCoOp, TCP, ...) loads, instead of "
                             "an ONNX model (OpenAI CLIP architectures)")
    parser.add_argument("--dassl-precision", choices=tuple(PRECISIONS), default="fp16",
                        help="--dassl: dtype of the saved tensors; fp16 as the official "
                             "trainers save under their default PREC fp16, fp32 keeps the run's "
                             "tensors exactly (default: %(default)s)")


COMMANDS = ("import-dassl",)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "import-dassl", help="a checkpoint of the official code (Dassl) as a run folder",
        description="Read a prompt learner checkpoint written by the papers' own code (Dassl's "
                    "prompt_learner/model.pth.tar-N or model-best.pth.tar, or an output "
                    "folder: its latest) into a new run folder that eval --data, export and "
                    "predict work on. Nothing in the file is imported or run: optimiser and "
                    "scheduler objects are read as inert stand-ins.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="model.pth.tar-N, model-best.pth.tar, or an output folder")
    p.add_argument("--learner", required=True, choices=tuple(official_learners()),
                   help="the official trainer that wrote it (prograd: CoOp's context trained "
                        "with ProGrad)")
    p.add_argument("--classnames", metavar="FILE", required=True,
                   help="its class names, one per line, in the trained order (underscores "
                        "become spaces, as in the official prompts)")
    p.add_argument("--out", metavar="RUN", required=True, help="new run folder")
    p.add_argument("--class-token-position", choices=CLASS_TOKEN_POSITIONS, default="end",
                   help="CoOp, ProGrad: TRAINER.COOP.CLASS_TOKEN_POSITION of the official "
                        "config (default: %(default)s)")
    p.add_argument("--kg-template", default=None, metavar="TEMPLATE",
                   help="KgCoOp, TCP: the official CUSTOM_TEMPLATES entry of the data set, e.g. "
                        "'a photo of a {}, a type of pet.' (TCP's meta network reads its "
                        "features; default: 'a photo of a {}.')")
    common.add_model_args(p)
    p.set_defaults(func=cmd_import_dassl)
