"""``fastprompt cache``, ``train``, ``eval`` and ``demo``: their arguments and commands."""
from __future__ import annotations

import argparse
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
    g.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when present; cuda is cuda:LOCAL_RANK under "
                   "torchrun)")


def _device(name: str | None) -> str:
    """The ``--device`` value, checked: a torch device type this machine has."""
    import torch
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    from fastprompt.train.distributed import rank_device
    name = rank_device(name)  # torchrun: one GPU per process
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} asked for, but torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device: {name!r} is not supported (cpu or cuda)")
    return name


class _DataFolders(argparse.Action):
    """--data DIR: the last one in ``data`` as before, every one in ``data_all`` (SoftCPT takes
    one folder per task)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.data = values
        namespace.data_all = [*(getattr(namespace, "data_all", None) or []), values]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from fastprompt.data import DEFAULT_TEST_FRACTION, DEFAULT_VIEWS, NOISE_TYPES
    from fastprompt.data.cache import DEFAULT_CHUNK_SIZE
    from fastprompt.data.source import SUBSAMPLES
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
    g.add_argument("--subsample", choices=SUBSAMPLES, default="all",
                   help="base-to-new protocol: train on the base half of the classes (labels "
                   "sorted, the first ceil(C/2)) or the new half (default: %(default)s)")
    # Checked here: the library's errors would name its parameters (batch_size, chunk_size,
    # num_workers), not these flags.
    g.add_argument("--batch-size-cache", type=_int_at_least(1), default=128,
                   help="images per encoder batch")
    g.add_argument("--cache-chunk", type=_int_at_least(1), default=DEFAULT_CHUNK_SIZE,
                   metavar="VIEWS",
                   help="views per chunk file of a cache build (whole encoder batches); a build "
                   "resumes from the chunk files of an interrupted one with the same value "
                   "(default: %(default)s)")
    g.add_argument("--workers", type=_int_at_least(0), default=0,
                   help="data loader workers while caching")


def _int_at_least(low: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value!r}")
        return number
    parse.__name__ = f"int >= {low}"
    return parse


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from fastprompt.train import METHODS, TARGETS, TrainConfig
    d = TrainConfig()
    g = p.add_argument_group("method (every combination works)")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="coop: cross-entropy; dspt: double softmax; softcpt: several tasks")
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
    g.add_argument("--text-chunk", type=_text_chunk, default=0, metavar="K",
                   help="exact low-memory text backward: re-encode the class prompts K at a time "
                        "(one extra text forward; memory of K prompts, not all C); 0: plain "
                        "backward (default); auto: the plain backward when all classes fit in "
                        "half the free memory, else the largest K that does. Not part of the "
                        "run's identity")


def _text_chunk(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected classes per chunk or 'auto', got {value!r}")


def _add_softcpt_args(parser: argparse.ArgumentParser) -> None:
    from fastprompt.train import TrainConfig
    d = TrainConfig()
    g = parser.add_argument_group("SoftCPT (--method softcpt: several tasks, one meta network)")
    g.add_argument("--tasks", metavar="TASKS.json",
                   help='tasks file: [{"name": ..., "data": DIR, "split_file": FILE?}, ...] '
                        "(or give --data once per task)")
    g.add_argument("--task-names", nargs="+", metavar="NAME",
                   help="task names for several --data folders (default: the folder names)")
    g.add_argument("--n-task-ctx", type=int, default=d.n_task_ctx,
                   help="learnable task context tokens before each task name (default: %(default)s)")
    g.add_argument("--task-ctx", choices=("shared", "per-task"), default="shared",
                   help="one task context for all tasks, or one per task (default: %(default)s)")
    g.add_argument("--softcpt-loss", choices=("coop", "dspt"), default="coop",
                   help="the per-task loss: cross-entropy or DSPT's double softmax (default: %(default)s)")


def _config_from(args, shots: int | None) -> "TrainConfig":
    """The TrainConfig of ``train``'s arguments; ``shots`` sets CoOp's default epoch count."""
    from fastprompt.train import TrainConfig, coop_epochs
    from fastprompt.train.softcpt import SOFTCPT_EPOCHS
    softcpt = args.method == "softcpt"
    uses_dspt = args.method == "dspt" or (softcpt and args.softcpt_loss == "dspt")
    if args.epochs is not None:
        epochs = args.epochs
    else:
        epochs = SOFTCPT_EPOCHS if softcpt else coop_epochs(shots)
    return TrainConfig(
        model=args.model, pretrained=os.path.abspath(args.pretrained) if args.pretrained else None,
        n_ctx=args.n_ctx, ctx_init=args.ctx_init, class_specific=args.class_specific,
        class_token_position=args.class_token_position,
        learner="softcpt" if softcpt else "coop", loss="dspt" if uses_dspt else "ce",
        targets=args.targets, smoothing=args.smoothing, alternate=args.alternate,
        alternate_period=args.alternate_period, csl_temperature=args.csl_temperature,
        prograd=args.prograd, lam=args.lam, temperature=args.temperature,
        n_task_ctx=args.n_task_ctx, task_ctx=args.task_ctx.replace("-", "_"), epochs=epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
        amp=not args.no_amp)


def _load_model(args, image_tower: bool = True):
    from fastprompt.models import create_model
    device = _device(args.device)
    model, preprocess_train, preprocess_val, tokenizer = create_model(
        args.model, args.pretrained, device, image_tower=image_tower)
    if args.pretrained is None and _is_writer():
        print(f"fastprompt: {args.model} has RANDOM weights (no --pretrained FILE; the same "
              "seeded draw in every process): accuracies mean little.", file=sys.stderr)
    return model, preprocess_train, preprocess_val, tokenizer, device


def _build_cache(args, path, model, preprocess_train, preprocess_val, progress=None):
    from fastprompt.data.cache import build_or_load_cache, check_cache_weights
    if not args.data:
        raise ValueError("--data: a data folder is required (or --cache FILE of a built cache)")
    check_cache_weights(path, model, args.rebuild_cache)
    # Unreadable images are skipped with a warning that counts and names them.
    splits = _data_source(args).load(shots=args.shots)
    _print_classes(splits.classnames, "" if args.subsample == "all" else f" ({args.subsample} half)")
    return build_or_load_cache(path, model, args.model, preprocess_train, preprocess_val, splits,
                               views=args.views, shots=args.shots, noise_rate=args.noise_rate,
                               noise_type=args.noise_type, seed=args.seed,
                               batch_size=args.batch_size_cache, num_workers=args.workers,
                               progress=progress, chunk_size=args.cache_chunk)


def _is_writer() -> bool:
    """Rank 0 of a torchrun launch, or a single process: the one that prints and writes. Read
    from torchrun's environment, so it holds before a process group exists and for ``cache``,
    which needs none."""
    from fastprompt.data.cache import torchrun_rank
    return torchrun_rank()[0] == 0


def _print_classes(classnames, where: str = "") -> None:
    if not _is_writer():
        return
    shown = ", ".join(repr(c) for c in classnames[:5])
    more = f", ... ({len(classnames)} in all)" if len(classnames) > 5 else ""
    print(f"fastprompt: {len(classnames)} classes{where}: {shown}{more}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_cache(args) -> int:
    """Under torchrun every rank encodes its share of the chunks; rank 0 merges and reports."""
    model, pt, pv, _, _ = _load_model(args)
    cache = _build_cache(args, args.out, model, pt, pv)
    if not _is_writer():
        return 0
    print(f"cache {cache.path}: {cache.num_classes} classes, {cache.num_train_images} training "
          f"images x {cache.views} views, {cache.test_features.shape[0]} test images, "
          f"feature dim {cache.feature_dim}")
    return 0


def cmd_train(args) -> int:
    """``fastprompt train``; under ``torchrun`` with several processes, each one a rank of one
    run with the classes sharded over them (``fastprompt.train.distributed``)."""
    from fastprompt.train.distributed import torchrun_process_group
    with torchrun_process_group(args.device, args.dist_timeout) as device:
        args.device = device
        if args.method == "softcpt" or args.tasks:
            return cmd_train_softcpt(args)
        return _cmd_train_coop(args)


def _print_ranks(classes: str) -> None:
    """Rank 0 says how many ranks it runs and how the classes are split over them."""
    import torch.distributed as dist

    from fastprompt.train.distributed import world
    rank, ranks = world()
    if ranks > 1 and rank == 0:
        print(f"fastprompt: {ranks} ranks ({dist.get_backend()}), {classes}", file=sys.stderr)


def _cmd_train_coop(args) -> int:
    from fastprompt.data.cache import load_cache_for
    from fastprompt.train import train_run
    from fastprompt.train.class_sharding import shard_bounds
    from fastprompt.train.distributed import world_size
    if len(getattr(args, "data_all", None) or []) > 1:
        raise ValueError("--data: given several times; several folders train together only "
                         "with --method softcpt")
    from_cache = bool(args.cache and not args.data)
    if from_cache and args.subsample != "all":
        raise ValueError("--subsample: takes the classes of --data DIR; give --data (a cache "
                         "built with --subsample can be named with --cache alongside it)")
    if from_cache:  # CoOp's epoch count follows the cache's shots
        from fastprompt.data import load_cache
        shots = load_cache(args.cache, verify=False).fingerprint.get("shots")
        if args.shots is not None and args.shots != shots:
            raise ValueError(f"--shots: {args.cache} holds {shots or 'all'} shots per class, "
                             f"not {args.shots}")
    else:
        shots = args.shots
    config = _config_from(args, shots)
    # Training from a built cache never encodes an image: the image tower is not loaded.
    model, pt, pv, tokenizer, device = _load_model(args, image_tower=not from_cache)
    if from_cache:
        cache = load_cache_for(args.cache, model, args.model)
    else:
        # Under torchrun every rank encodes its share of the cache's chunks (through files).
        cache = _build_cache(args, args.cache or os.path.join(args.out, "features.safetensors"),
                             model, pt, pv, progress=None if _is_writer() else False)
    sizes = [b - a for a, b in shard_bounds(cache.num_classes, world_size())]
    _print_ranks(f"{cache.num_classes} classes: {' + '.join(map(str, sizes))} per rank")
    metrics = train_run(config, cache, model, tokenizer, args.out, resume=args.resume,
                        device=device, progress=_progress(args), compile=args.compile,
                        text_chunk=args.text_chunk,
                        data=None if from_cache else _data_source(args).to_dict())
    if not _is_writer():
        return 0
    _plot_curves(args.out)
    print(f"{metrics['method']}: test accuracy {metrics['test_acc']:.4f} "
          f"(zero-shot {metrics['zeroshot_test_acc']:.4f}), median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")
    return 0


def _data_source(args):
    """``--data`` and how to split it (recorded in the run's metrics.json: what evaluation on
    its other half of the classes, base-to-new, reads back)."""
    from fastprompt.data.source import DataSource
    return DataSource.create(args.data, split_file=args.split_file,
                             test_fraction=args.test_fraction, seed=args.seed,
                             subsample=args.subsample)


def _plot_curves(run_dir: str) -> None:
    """RUN/curves.png (loss and train accuracy per epoch); `fastprompt plot RUN` redraws it."""
    from fastprompt.protocols.plots import plot_curves
    plot_curves(run_dir)


def _progress(args) -> bool | None:
    return False if args.no_progress or not _is_writer() else None


def cmd_train_softcpt(args) -> int:
    """``fastprompt train --method softcpt``: read and check every task, then cache each task's
    features under ``OUT/features/`` and train. Bad input writes nothing."""
    from fastprompt.data.cache import build_or_load_cache, check_cache_weights, task_cache_path
    from fastprompt.data.tasks import load_task_datasets, read_tasks_file, task_specs_from_folders
    from fastprompt.train import Task, train_softcpt_run
    from fastprompt.train.files import refuse_existing_run
    if args.method != "softcpt":
        raise ValueError(f"--tasks: training several tasks is SoftCPT's; add --method softcpt "
                         f"(got --method {args.method})")
    if args.compile:
        raise ValueError("--compile: not supported with --method softcpt (its batches mix tasks "
                         "in proportions that change every step, so no one graph fits); it "
                         "compiles --method coop and dspt steps")
    folders = getattr(args, "data_all", None) or ([args.data] if args.data else [])
    if args.tasks and folders:
        raise ValueError("--tasks: give the tasks either in a tasks file or as --data folders, "
                         "not both")
    if args.cache:
        raise ValueError("--cache: SoftCPT keeps one feature cache per task in OUT/features/")
    if args.split_file:
        raise ValueError("--split-file: with SoftCPT, name each task's split file in the tasks "
                         "file (\"split_file\")")
    if args.subsample != "all":
        raise ValueError("--subsample: SoftCPT trains on whole tasks; base-to-new applies to "
                         "--method coop and dspt")
    if args.tasks:
        if args.task_names:
            raise ValueError("--task-names: the tasks file names its tasks")
        specs = read_tasks_file(args.tasks)
    elif folders:
        specs = task_specs_from_folders(folders, args.task_names)
    else:
        raise ValueError("--tasks: SoftCPT needs tasks: --tasks TASKS.json, or --data once per task")
    splits = load_task_datasets(specs, test_fraction=args.test_fraction, seed=args.seed)
    config = _config_from(args, args.shots)
    # Checked before any cache is written: a damaged or CoOp checkpoint is refused here already.
    refuse_existing_run(args.out, args.resume, "softcpt")
    model, pt, pv, tokenizer, device = _load_model(args)
    tasks = []
    for i, (spec, split) in enumerate(zip(specs, splits)):
        path = task_cache_path(args.out, i, spec.name)
        check_cache_weights(path, model, args.rebuild_cache)
        _print_classes(split.classnames, f" in task {spec.name!r}")
        cache = build_or_load_cache(path, model, args.model, pt, pv, split, views=args.views,
                                    shots=args.shots, noise_rate=args.noise_rate,
                                    noise_type=args.noise_type, seed=args.seed,
                                    batch_size=args.batch_size_cache, num_workers=args.workers,
                                    progress=_progress(args), chunk_size=args.cache_chunk)
        tasks.append(Task(spec.name, cache))
    _print_ranks(f"each batch's classes (those of its tasks, up to "
                 f"{sum(t.cache.num_classes for t in tasks)}) split evenly over them")
    metrics = train_softcpt_run(config, tasks, model, tokenizer, args.out, resume=args.resume,
                                device=device, progress=_progress(args),
                                text_chunk=args.text_chunk)
    if not _is_writer():
        return 0
    _plot_curves(args.out)
    for t in metrics["tasks"]:
        print(f"  {t['name']}: test accuracy {t['test_acc']:.4f} (zero-shot "
              f"{t['zeroshot_test_acc']:.4f}), {t['num_classes']} classes")
    print(f"{metrics['method']} over {len(tasks)} tasks: average test accuracy "
          f"{metrics['test_acc']:.4f} (zero-shot {metrics['zeroshot_test_acc']:.4f}), "
          f"{metrics['trainable_parameters']} trained parameters, median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from fastprompt._io import dumps_json
    from fastprompt.cli import protocols
    from fastprompt.protocols.evaluation import evaluate_run
    if protocols.wants_eval_on_data(args):
        return protocols.cmd_eval_on_data(args)
    result = evaluate_run(args.run, args.cache, device=_device(args.device or "cpu"),
                          task=args.task)
    if args.json:
        print(dumps_json(result, indent=2))
        return 0
    for t in result.get("tasks", []):
        print(f"  {t['name']}: test accuracy {t['test_acc']:.4f} on {t['num_test_images']} images")
    what = "average test accuracy" if "tasks" in result else "test accuracy"
    print(f"{what} {result['test_acc']:.4f} on {result['num_test_images']} images")
    return 0


def cmd_demo(args) -> int:
    from fastprompt.demo import run_demo
    return run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)


COMMANDS = ("cache", "train", "eval", "demo")


def add_commands(sub) -> None:
    """Register cache, train, eval and demo on the ``fastprompt`` sub-parsers."""
    from fastprompt.cli import protocols
    from fastprompt.train.distributed import DEFAULT_TIMEOUT_S
    p = sub.add_parser("cache", help="run the frozen image encoder once and cache its features")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="cache file (.safetensors)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="rebuild a cache file built with other model weights instead of refusing it")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="tune a prompt on cached features")
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--cache", metavar="FILE",
                   help="feature cache (built or reused; default: OUT/features.safetensors)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--compile", action="store_true",
                   help="compile each training step as one graph (torch.compile; CUDA graphs on "
                   "CUDA): faster steps after a compilation of a minute or so; same result to "
                   "float32 rounding; a run resumes with or without it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="rebuild a cache file built with other model weights instead of refusing it")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun with several processes (the classes sharded over them): "
                        "how long a rank waits for the others before it fails (default: "
                        "%(default)s)")
    _add_softcpt_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a trained run")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--cache", metavar="FILE",
                   help="feature cache (default: the run's own; SoftCPT: every task's own)")
    p.add_argument("--task", metavar="NAME", default=None,
                   help="SoftCPT runs: evaluate this task only (default: every task)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    protocols.add_eval_data_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on generated data and a tiny random model")
    p.add_argument("--out", default="demo_runs", help="work folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per method (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
