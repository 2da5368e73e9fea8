"""``fastprompt cache``, ``train``, ``eval`` and ``demo``: their arguments and commands."""
from __future__ import annotations

import argparse
import json
import os
import sys


# ---------------------------------------------------------------------------------------------
# Arguments shared by several commands


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="fastprompt-tiny",
                   help="open_clip model name, e.g. ViT-B-16 (default: %(default)s, random weights)")
    g.add_argument("--pretrained", metavar="FILE", default=None,
                   help="local checkpoint of that model (.safetensors/.bin/.pt); nothing is downloaded")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


class _DataFolders(argparse.Action):
    """--data DIR: the last one in ``data`` as before, every one in ``data_all`` (SoftCPT takes
    one folder per task)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.data = values
        namespace.data_all = [*(getattr(namespace, "data_all", None) or []), values]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from fastprompt.data import DEFAULT_TEST_FRACTION, DEFAULT_VIEWS, NOISE_TYPES
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", action=_DataFolders,
                   help="image folder (one sub-folder per class, or train/ and test/), or the "
                   "image root of a CoOp split file (SoftCPT: once per task)")
    g.add_argument("--split-file", metavar="FILE", help="CoOp split_zhou_<Name>.json (relative to --data)")
    g.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="test share per class when the folder has no train/test split (default: %(default)s)")
    g.add_argument("--shots", type=int, default=None, help="few-shot: K training images per class")
    g.add_argument("--noise-rate", type=float, default=0.0, help="label noise rate for robustness studies")
    g.add_argument("--noise-type", choices=NOISE_TYPES, default="symmetric")
    g.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                   help="augmented views cached per training image (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1, help="seed of sampling, noise, views and training")
    g.add_argument("--batch-size-cache", type=int, default=128, help="images per encoder batch")
    g.add_argument("--workers", type=int, default=0, help="data loader workers while caching")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from fastprompt.train import METHODS, TARGETS, TrainConfig
    d = TrainConfig()
    g = p.add_argument_group("method (every combination works)")
    g.add_argument("--method", choices=METHODS, default=d.method, help="coop: cross-entropy; dspt: double softmax")
    g.add_argument("--targets", choices=TARGETS, default=d.targets,
                   help="hard, ls (label smoothing), csl/isl (ATLaS class-/instance-wise soft labels)")
    g.add_argument("--smoothing", type=float, default=d.smoothing, help="weight of the soft part (default: %(default)s)")
    g.add_argument("--alternate", action="store_true",
                   help="ATLaS: K-1 epochs on hard labels, then one on soft targets, repeated")
    g.add_argument("--alternate-period", type=int, default=d.alternate_period, help="ATLaS K (default: %(default)s)")
    g.add_argument("--csl-temperature", type=float, default=d.csl_temperature,
                   help="softmax temperature of the class-wise table (default: %(default)s)")
    g.add_argument("--prograd", action="store_true", help="ProGrad gradient projection")
    g.add_argument("--lam", type=float, default=d.lam, help="ProGrad lambda (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="ProGrad KL temperature")
    g = p.add_argument_group("prompt (CoOp)")
    g.add_argument("--n-ctx", type=int, default=d.n_ctx)
    g.add_argument("--ctx-init", default=d.ctx_init, help='initial phrase, e.g. "a photo of a"')
    g.add_argument("--class-specific", action="store_true", help="one context per class (CSC)")
    g.add_argument("--class-token-position", choices=("end", "middle", "front"), default="end")
    g = p.add_argument_group("optimisation (CoOp defaults)")
    g.add_argument("--epochs", type=int, default=None,
                   help="default: CoOp's count for --shots (50/100/200; 200 without --shots)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")


def _config_from(args) -> "TrainConfig":
    from fastprompt.train import TrainConfig, coop_epochs
    return TrainConfig(
        model=args.model, pretrained=os.path.abspath(args.pretrained) if args.pretrained else None,
        n_ctx=args.n_ctx, ctx_init=args.ctx_init, class_specific=args.class_specific,
        class_token_position=args.class_token_position, method=args.method, targets=args.targets,
        smoothing=args.smoothing, alternate=args.alternate, alternate_period=args.alternate_period,
        csl_temperature=args.csl_temperature, prograd=args.prograd, lam=args.lam,
        temperature=args.temperature,
        epochs=args.epochs if args.epochs is not None else coop_epochs(args.shots),
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
        amp=not args.no_amp)


def _load_model(args):
    from fastprompt.models import create_model
    device = args.device or ("cuda" if _cuda() else "cpu")
    model, preprocess_train, preprocess_val, tokenizer = create_model(args.model, args.pretrained, device)
    if args.pretrained is None:
        print(f"fastprompt: {args.model} has RANDOM weights (no --pretrained FILE): accuracies "
              "mean little and the run cannot be rebuilt for export.", file=sys.stderr)
    return model, preprocess_train, preprocess_val, tokenizer, device


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _build_cache(args, path, model, preprocess_train, preprocess_val, progress=None):
    from fastprompt.data import build_or_load_cache, load_dataset
    if not args.data:
        raise ValueError("--data: a data folder is required (or --cache FILE of a built cache)")
    # Unreadable images are skipped with a warning that counts and names them.
    splits = load_dataset(args.data, split_file=args.split_file, test_fraction=args.test_fraction,
                          seed=args.seed)
    return build_or_load_cache(path, model, args.model, preprocess_train, preprocess_val, splits,
                               views=args.views, shots=args.shots, noise_rate=args.noise_rate,
                               noise_type=args.noise_type, seed=args.seed,
                               batch_size=args.batch_size_cache, num_workers=args.workers,
                               progress=progress)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_cache(args) -> int:
    model, pt, pv, _, _ = _load_model(args)
    cache = _build_cache(args, args.out, model, pt, pv)
    print(f"cache {cache.path}: {cache.num_classes} classes, {cache.num_train_images} training "
          f"images x {cache.views} views, {cache.test_features.shape[0]} test images, "
          f"feature dim {cache.feature_dim}")
    return 0


def cmd_train(args) -> int:
    from fastprompt.data import load_cache
    from fastprompt.train import train_run
    # --- SoftCPT hook: several tasks, one feature cache each (fastprompt/train/softcpt.py) ---
    if args.method == "softcpt" or args.tasks:
        from fastprompt.train.softcpt import cmd_train_softcpt
        return cmd_train_softcpt(args)
    if len(getattr(args, "data_all", None) or []) > 1:
        raise ValueError("--data: given several times; several folders train together only "
                         "with --method softcpt")
    # ---
    config = _config_from(args)
    model, pt, pv, tokenizer, device = _load_model(args)
    if args.cache and not args.data:
        cache = load_cache(args.cache)
        if cache.fingerprint.get("model_name") != args.model:
            raise ValueError(f"--cache: {args.cache} was built with model "
                             f"{cache.fingerprint.get('model_name')!r}, not {args.model!r}")
    else:
        cache = _build_cache(args, args.cache or os.path.join(args.out, "features.safetensors"),
                             model, pt, pv)
    metrics = train_run(config, cache, model, tokenizer, args.out, resume=args.resume,
                        device=device, progress=not args.no_progress)
    print(f"{metrics['method']}: test accuracy {metrics['test_acc']:.4f} "
          f"(zero-shot {metrics['zeroshot_test_acc']:.4f}), median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from fastprompt.data import load_cache
    from fastprompt.train import evaluate_run
    cache_path = args.cache
    if cache_path is None:
        metrics_path = os.path.join(args.run, "metrics.json")
        if not os.path.isfile(metrics_path):
            raise ValueError(f"run: {args.run!r} has no metrics.json; pass --cache FILE")
        with open(metrics_path) as f:
            cache_path = json.load(f)["cache"]["path"]
    result = evaluate_run(args.run, load_cache(cache_path), device=args.device or "cpu")
    print(json.dumps(result, indent=2) if args.json else
          f"test accuracy {result['test_acc']:.4f} on {result['num_test_images']} images ({cache_path})")
    return 0


def cmd_demo(args) -> int:
    from fastprompt.demo import run_demo
    return run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)


def add_commands(sub) -> None:
    """Register cache, train, eval and demo on the ``fastprompt`` sub-parsers."""
    p = sub.add_parser("cache", help="run the frozen image encoder once and cache its features")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="cache file (.safetensors)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="tune a prompt on cached features")
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--cache", metavar="FILE",
                   help="feature cache (built or reused; default: OUT/features.safetensors)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from fastprompt.train.softcpt import add_softcpt_args  # SoftCPT hook: --tasks, --task-ctx, ...
    add_softcpt_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a trained run")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--cache", metavar="FILE", help="feature cache (default: the run's own)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on generated data and a tiny random model")
    p.add_argument("--out", default="demo_runs", help="work folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per method (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
