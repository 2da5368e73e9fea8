"""``fastprompt demo``: the whole pipeline on generated data and a tiny random model."""
from __future__ import annotations

from fastprompt.demo import run_demo


def cmd_demo(args) -> None:
    run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)


COMMANDS = ("demo",)


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on generated data and a tiny random model")
    p.add_argument("--out", default="demo_runs", help="work folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per method (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
