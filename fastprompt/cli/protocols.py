"""The papers' evaluation protocols on the command line: ``eval --data`` (cross-dataset and
domain shift), ``eval --base-to-new``, ``sweep`` and ``plot``."""
from __future__ import annotations

import argparse
import sys


# ---------------------------------------------------------------------------------------------
# eval on other data


def add_eval_data_args(p: argparse.ArgumentParser) -> None:
    """``fastprompt eval``'s options for other data sets and class halves."""
    from fastprompt.data import DEFAULT_TEST_FRACTION
    from fastprompt.data.source import SUBSAMPLES
    g = p.add_argument_group("other data (cross-dataset, domain shift, base-to-new)")
    g.add_argument("--data", metavar="DIR",
                   help="evaluate on this data set's test images, classifying among ITS class "
                   "names with the run's learned context")
    g.add_argument("--split-file", metavar="FILE", help="CoOp split file of --data (relative to it)")
    g.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="test share per class of a folder without a split (default: %(default)s)")
    g.add_argument("--all-images", action="store_true",
                   help="every image of --data is a test image (evaluation-only sets such as "
                   "ImageNet-A/R/Sketch laid out as class folders)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the test split of a folder without one (default: the run's)")
    g.add_argument("--subsample", choices=SUBSAMPLES, default="all",
                   help="evaluate on this half of --data's classes (default: %(default)s)")
    g.add_argument("--base-to-new", action="store_true",
                   help="base and new accuracy and their harmonic mean H of a run trained with "
                   "--subsample base, on the data it was trained on")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where the test images' features are cached (default: RUN/eval/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or lines")


def wants_eval_on_data(args) -> bool:
    return bool(args.data or args.base_to_new)


def cmd_eval_on_data(args) -> int:
    from fastprompt._io import dumps_json
    from fastprompt.protocols.evaluation import base_to_new, evaluate_on_data
    from fastprompt.train.files import read_prompt_file
    from fastprompt.cli.training import _device
    if args.cache:
        raise ValueError("--cache: names a cache of the run's own classes; with --data or "
                         "--base-to-new the test features are cached in --cache-dir")
    options = dict(cache_dir=args.cache_dir, device=_device(args.device or "cpu"),
                   progress=False if args.no_progress else None)
    if args.base_to_new:
        if args.data or args.subsample != "all" or args.task:
            raise ValueError("--base-to-new: evaluates on the data the run was trained on; drop "
                             "--data, --subsample and --task")
        result = base_to_new(args.run, **options)
        if args.json:
            print(dumps_json(result, indent=2))
            return 0
        for half in ("base", "new"):
            r = result[half]
            print(f"{half}: accuracy {r['test_acc']:.4f} on {r['num_test_images']} images of "
                  f"{r['num_classes']} classes (zero-shot {r['zeroshot_test_acc']:.4f})")
        z = result["zeroshot"]
        print(f"H = 2BN/(B+N) = {result['hm']:.4f} (zero-shot {z['hm']:.4f})")
        return 0

    from fastprompt.data.source import DataSource
    seed = args.seed if args.seed is not None else read_prompt_file(args.run).config.seed
    source = DataSource.create(args.data, split_file=args.split_file,
                               test_fraction=args.test_fraction, seed=seed,
                               subsample=args.subsample)
    result = evaluate_on_data(args.run, source, all_images=args.all_images, task=args.task,
                              **options)
    if args.json:
        print(dumps_json(result, indent=2))
        return 0
    print(f"test accuracy {result['test_acc']:.4f} on {result['num_test_images']} images of "
          f"{result['num_classes']} classes of {source.root} (zero-shot "
          f"{result['zeroshot_test_acc']:.4f})")
    return 0


# ---------------------------------------------------------------------------------------------
# sweep and plot


def cmd_sweep(args) -> int:
    from fastprompt.protocols.sweep import run_sweep
    from fastprompt.protocols.sweep_grid import load_spec
    spec = load_spec(args.spec)
    result = run_sweep(spec, args.out, jobs=args.jobs,
                       progress=False if args.no_progress else None)
    print(f"sweep: {len(result.trained)} trained, {len(result.resumed)} resumed, "
          f"{len(result.skipped)} already finished, {len(result.failed)} failed; report in "
          f"{args.out}/report.md")
    for job, message in result.failed:
        print(f"fastprompt sweep: failed: {job.describe()} ({job.run_dir}): {message}",
              file=sys.stderr)
    return 1 if result.failed else 0


def cmd_plot(args) -> int:
    from fastprompt.protocols.report import redraw
    for path in redraw(args.paths):
        print(path)
    return 0


COMMANDS = ("sweep", "plot")


def add_commands(sub) -> None:
    """Register sweep and plot on the ``fastprompt`` sub-parsers."""
    p = sub.add_parser(
        "sweep", help="a grid of runs (methods, shots, noise, seeds) under one protocol, and "
        "its report",
        description="Train every run of the grid in SPEC (JSON, or YAML when PyYAML is "
        "installed; see docs/protocols.md) into OUT/runs/, evaluate each by the protocol "
        "(few-shot, base-to-new, cross-dataset), and write OUT/report.md, OUT/report.csv and "
        "the plots. Features are encoded once per (data, shots, seed, views). Rerunning skips "
        "finished runs and resumes interrupted ones.")
    p.add_argument("spec", metavar="SPEC", help="sweep spec file (.json, .yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep folder")
    p.add_argument("--jobs", type=int, default=1, metavar="K",
                   help="runs trained at once, in worker processes (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="redraw the plots of run folders or sweep folders",
                       description="A run folder gets its curves.png (loss and train accuracy "
                       "on the noisy and the clean labels per epoch); a sweep folder its report, "
                       "plots and every run's curves.png.")
    p.add_argument("paths", nargs="+", metavar="RUN", help="run folders or sweep folders")
    p.set_defaults(func=cmd_plot)
