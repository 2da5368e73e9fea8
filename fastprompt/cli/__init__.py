"""``fastprompt`` command line: cache, train, eval, export, predict, demo.

Every command returns 0 on success and 2 on bad input, with a message naming the argument or
file on stderr (``fastprompt <command>: error: ...``); nothing half-written is left behind.
The only package that parses arguments: each module registers its commands on one parser.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fastprompt.cli import deploy, training

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    training.add_commands(sub)
    deploy.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # open_clip logs "No pretrained weights loaded" for random models; fastprompt says it itself.
    logging.getLogger().setLevel(logging.ERROR)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"fastprompt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastprompt {args.command}: interrupted (finished epochs are kept; --resume "
              "continues)", file=sys.stderr)
        return 130
