"""What several training-side commands share: the model and data arguments, the checked
``--device``, loading the model, building the feature cache, and who prints under ``torchrun``."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from fastprompt._checks import SEED_RANGE, check_seed
from fastprompt.cli.types import int_at_least
from fastprompt.data import DEFAULT_TEST_FRACTION, DEFAULT_VIEWS, NOISE_TYPES
from fastprompt.data.cache import (DEFAULT_CHUNK_SIZE, build_or_load_cache, check_cache_weights,
                                   torchrun_rank)
from fastprompt.data.sampling import check_noise_rate
from fastprompt.data.source import SUBSAMPLES, DataSource
from fastprompt.models import create_model
from fastprompt.models.factory import check_device
from fastprompt.protocols.plots import plot_curves
from fastprompt.train.distributed import rank_device, world


def seed(value: str) -> int:
    """An argparse type: a seed in the one range every seed takes (``check_seed``), refused by
    argparse naming the flag otherwise."""
    try:
        return check_seed(int(value))
    except ValueError:  # not an int, or out of range
        raise argparse.ArgumentTypeError(
            f"expected an int in {SEED_RANGE}, got {value!r}") from None


def noise_rate(value: str) -> float:
    """An argparse type: a label-noise rate in the range a sweep spec and the library take
    (``check_noise_rate``), refused by argparse naming the flag otherwise."""
    try:
        return check_noise_rate(float(value))
    except ValueError:  # not a number, or out of range
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1], got {value!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="fastprompt-tiny",
                   help="open_clip model name, e.g. ViT-B-16 (default: %(default)s, random weights)")
    g.add_argument("--pretrained", metavar="FILE", default=None,
                   help="local checkpoint of that model (.safetensors/.bin/.pt); nothing is downloaded")
    g.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when present; cuda is cuda:LOCAL_RANK under "
                   "torchrun)")


class _DataFolders(argparse.Action):
    """--data DIR: the last one in ``data`` as before, every one in ``data_all`` (SoftCPT takes
    one folder per task)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.data = values
        namespace.data_all = [*(getattr(namespace, "data_all", None) or []), values]


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", action=_DataFolders,
                   help="image folder (one sub-folder per class, or train/ and test/), or the "
                   "image root of a CoOp split file (SoftCPT: once per task)")
    g.add_argument("--split-file", metavar="FILE",
                   help="CoOp split_zhou_<Name>.json in --data (a path relative to --data, or an "
                   "absolute one inside it); the images it lists are read relative to its own "
                   "folder")
    g.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="test share per class when the folder has no train/test split (default: %(default)s)")
    g.add_argument("--shots", type=int, default=None, help="few-shot: K training images per class")
    g.add_argument("--noise-rate", type=noise_rate, default=0.0,
                   help="label noise rate for robustness studies, in [0, 1]: each label "
                   "corrupted with that probability")
    g.add_argument("--noise-per-class", type=int_at_least(0), default=None, metavar="K",
                   help="label noise by exact counts (PTNL, JoAPR), instead of --noise-rate: K "
                   "training images of every class get another class's label, and every label "
                   "goes to K images of other classes")
    g.add_argument("--noise-type", choices=NOISE_TYPES, default="symmetric")
    g.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                   help="augmented views cached per training image (default: %(default)s)")
    g.add_argument("--seed", type=seed, default=1,
                   help=f"seed of sampling, noise, views and training, in {SEED_RANGE}")
    g.add_argument("--subsample", choices=SUBSAMPLES, default="all",
                   help="base-to-new protocol: train on the base half of the classes (labels "
                   "sorted, the first ceil(C/2)) or the new half (default: %(default)s)")
    g.add_argument("--batch-size-cache", type=int_at_least(1), default=128,
                   help="images per encoder batch")
    g.add_argument("--cache-chunk", type=int_at_least(1), default=DEFAULT_CHUNK_SIZE,
                   metavar="VIEWS",
                   help="views per chunk file of a cache build (whole encoder batches); a build "
                   "resumes from the chunk files of an interrupted one with the same value "
                   "(default: %(default)s)")
    g.add_argument("--workers", type=int_at_least(0), default=0,
                   help="data loader workers while caching (--learner maple|ivlp|promptsrc: "
                   "while training and testing, each epoch's images decoded and augmented in them)")
    g.add_argument("--rebuild-cache", action="store_true",
                   help="rebuild a cache file built with other model weights instead of refusing it")


def device(name: str | None) -> str:
    """The ``--device`` value, checked: a torch device type this machine has."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(rank_device(name), "--device")  # torchrun: one GPU per process


def is_writer() -> bool:
    """Rank 0 of a torchrun launch, or a single process: the one that prints and writes. Read
    from torchrun's environment, so it holds before a process group exists and for ``cache``,
    which needs none."""
    return torchrun_rank()[0] == 0


def progress(args) -> bool | None:
    """Progress display: none with ``--no-progress`` or on ranks other than 0, else automatic."""
    return False if getattr(args, "no_progress", False) or not is_writer() else None


def load_model(args, image_tower: bool = True):
    """``(model, preprocess_train, preprocess_val, tokenizer, device)`` of ``--model``,
    ``--pretrained`` and ``--device``; a note on stderr when the weights are random."""
    name = device(args.device)
    model, preprocess_train, preprocess_val, tokenizer = create_model(
        args.model, args.pretrained, name, image_tower=image_tower)
    if args.pretrained is None and is_writer():
        print(f"fastprompt: {args.model} has RANDOM weights (no --pretrained FILE; the same "
              "seeded draw in every process): accuracies mean little.", file=sys.stderr)
    return model, preprocess_train, preprocess_val, tokenizer, name


def data_source(args) -> DataSource:
    """``--data`` and how to split it (recorded in the run's metrics.json: what evaluation on
    its other half of the classes, base-to-new, reads back)."""
    return DataSource.create(args.data, split_file=args.split_file,
                             test_fraction=args.test_fraction, seed=args.seed,
                             subsample=args.subsample)


def print_classes(classnames, where: str = "") -> None:
    if not is_writer():
        return
    shown = ", ".join(repr(c) for c in classnames[:5])
    more = f", ... ({len(classnames)} in all)" if len(classnames) > 5 else ""
    print(f"fastprompt: {len(classnames)} classes{where}: {shown}{more}", file=sys.stderr)


def check_noise_args(args) -> None:
    """One label-noise protocol at a time (``--noise-rate`` or ``--noise-per-class``)."""
    if args.noise_per_class is not None and args.noise_rate > 0:
        raise ValueError(f"--noise-per-class: one label-noise protocol at a time, got "
                         f"--noise-per-class {args.noise_per_class} and --noise-rate "
                         f"{args.noise_rate:g}; drop one of them")


def build_cache(args, path, model, preprocess_train, preprocess_val, *, splits=None,
                where: str = "", show_progress=None):
    """The feature cache at ``path`` of ``--data`` (or of ``splits``: a task's, said ``where``)
    with the data arguments, built or reused; one of other weights is refused unless
    ``--rebuild-cache``."""
    if splits is None and not args.data:
        raise ValueError("--data: a data folder is required (or --cache FILE of a built cache)")
    check_noise_args(args)
    check_cache_weights(path, model, args.rebuild_cache)
    if splits is None:
        # Unreadable images are skipped with a warning that counts and names them.
        splits = data_source(args).load(shots=args.shots)
        where = "" if args.subsample == "all" else f" ({args.subsample} half)"
    print_classes(splits.classnames, where)
    return build_or_load_cache(path, model, args.model, preprocess_train, preprocess_val, splits,
                               views=args.views, shots=args.shots, noise_rate=args.noise_rate,
                               noise_type=args.noise_type,
                               noise_per_class=args.noise_per_class, seed=args.seed,
                               batch_size=args.batch_size_cache, num_workers=args.workers,
                               progress=show_progress, chunk_size=args.cache_chunk)


def print_ranks(classes: str) -> None:
    """Rank 0 says how many ranks it runs and how the classes are split over them."""
    rank, ranks = world()
    if ranks > 1 and rank == 0:
        print(f"fastprompt: {ranks} ranks ({dist.get_backend()}), {classes}", file=sys.stderr)


def finish_run(run_dir: str) -> None:
    """RUN/curves.png (loss and train accuracy per epoch); `fastprompt plot RUN` redraws it."""
    plot_curves(run_dir)
