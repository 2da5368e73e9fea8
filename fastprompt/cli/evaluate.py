"""``fastprompt eval``: a trained run's accuracy on its own caches, on another data set's test
images with that data set's class names (cross-dataset, domain shift), or on both halves of
its classes (base-to-new)."""
from __future__ import annotations

import argparse

from fastprompt._io import dumps_json
from fastprompt.cli import common
from fastprompt.data import DEFAULT_TEST_FRACTION
from fastprompt.data.source import SUBSAMPLES, DataSource
from fastprompt.protocols.evaluation import base_to_new, evaluate_on_data, evaluate_run
from fastprompt.train.files import read_prompt_file


def cmd_eval(args) -> None:
    if args.data or args.base_to_new:
        _eval_on_data(args)
        return
    result = evaluate_run(args.run, args.cache, device=common.device(args.device or "cpu"),
                          task=args.task)
    if args.json:
        print(dumps_json(result, indent=2))
        return
    for t in result.get("tasks", []):
        print(f"  {t['name']}: test accuracy {t['test_acc']:.4f} on {t['num_test_images']} images")
    what = "average test accuracy" if "tasks" in result else "test accuracy"
    print(f"{what} {result['test_acc']:.4f} on {result['num_test_images']} images")


def _eval_on_data(args) -> None:
    if args.cache:
        raise ValueError("--cache: names a cache of the run's own classes; with --data or "
                         "--base-to-new the test features are cached in --cache-dir")
    options = dict(cache_dir=args.cache_dir, device=common.device(args.device or "cpu"),
                   progress=False if args.no_progress else None)
    if args.base_to_new:
        if args.data or args.subsample != "all" or args.task:
            raise ValueError("--base-to-new: evaluates on the data the run was trained on "
                             "(recorded in its metrics.json); drop --data, --subsample and "
                             "--task")
        result = base_to_new(args.run, **options)
        if args.json:
            print(dumps_json(result, indent=2))
            return
        for half in ("base", "new"):
            r = result[half]
            print(f"{half}: accuracy {r['test_acc']:.4f} on {r['num_test_images']} images of "
                  f"{r['num_classes']} classes (zero-shot {r['zeroshot_test_acc']:.4f})")
        z = result["zeroshot"]
        print(f"H = 2BN/(B+N) = {result['hm']:.4f} (zero-shot {z['hm']:.4f})")
        return

    seed = args.seed if args.seed is not None else read_prompt_file(args.run).config.seed
    source = DataSource.create(args.data, split_file=args.split_file,
                               test_fraction=args.test_fraction, seed=seed,
                               subsample=args.subsample)
    result = evaluate_on_data(args.run, source, all_images=args.all_images, task=args.task,
                              **options)
    if args.json:
        print(dumps_json(result, indent=2))
        return
    print(f"test accuracy {result['test_acc']:.4f} on {result['num_test_images']} images of "
          f"{result['num_classes']} classes of {source.root} (zero-shot "
          f"{result['zeroshot_test_acc']:.4f})")


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    """``fastprompt eval``'s options for other data sets and class halves."""
    g = p.add_argument_group("other data (cross-dataset, domain shift, base-to-new)")
    g.add_argument("--data", metavar="DIR",
                   help="evaluate on this data set's test images, classifying among ITS class "
                   "names with the run's learned context")
    g.add_argument("--split-file", metavar="FILE",
                   help="CoOp split file in --data (a path relative to --data, or an absolute "
                   "one inside it); the images it lists are read relative to its own folder")
    g.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="test share per class of a folder without a split (default: %(default)s)")
    g.add_argument("--all-images", action="store_true",
                   help="every image of --data is a test image (evaluation-only sets such as "
                   "ImageNet-A/R/Sketch laid out as class folders)")
    g.add_argument("--seed", type=common.seed, default=None,
                   help="seed of the test split of a folder without one (default: the run's)")
    g.add_argument("--subsample", choices=SUBSAMPLES, default="all",
                   help="evaluate on this half of --data's classes (default: %(default)s)")
    g.add_argument("--base-to-new", action="store_true",
                   help="base and new accuracy and their harmonic mean H of a run trained with "
                   "--subsample base, on the data it was trained on")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where the test images' features are cached (default: RUN/eval/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or lines")


COMMANDS = ("eval",)


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy of a trained run")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--cache", metavar="FILE",
                   help="feature cache (default: the run's own; SoftCPT: every task's own)")
    p.add_argument("--task", metavar="NAME", default=None,
                   help="SoftCPT runs: evaluate this task only (default: every task)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    _add_eval_data_args(p)
    p.set_defaults(func=cmd_eval)
