"""``fastprompt sweep`` and ``fastprompt plot``: a grid of runs under one of the papers'
protocols with its report, and the plots of run and sweep folders drawn again."""
from __future__ import annotations

import sys

from fastprompt.cli import PartlyFailed
from fastprompt.protocols.report import redraw
from fastprompt.protocols.sweep import run_sweep
from fastprompt.protocols.sweep_grid import load_spec


def cmd_sweep(args) -> None:
    spec = load_spec(args.spec)
    result = run_sweep(spec, args.out, jobs=args.jobs,
                       progress=False if args.no_progress else None)
    print(f"sweep: {len(result.trained)} trained, {len(result.resumed)} resumed, "
          f"{len(result.skipped)} already finished, {len(result.failed)} failed; report in "
          f"{args.out}/report.md")
    for job, message in result.failed:
        print(f"fastprompt sweep: failed: {job.describe()} ({job.run_dir}): {message}",
              file=sys.stderr)
    if result.failed:
        total = len(result.trained) + len(result.resumed) + len(result.skipped) + len(result.failed)
        raise PartlyFailed(f"{len(result.failed)} of {total} runs failed")


def cmd_plot(args) -> None:
    for path in redraw(args.paths):
        print(path)



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
