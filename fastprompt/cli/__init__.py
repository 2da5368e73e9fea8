"""fastprompt command line: cache, train, eval, demo, export, predict, sweep, plot.

Every command returns 0 on success and 2 on bad input or an anticipated failure (a damaged or
locked file, a full or read-only disk, a missing GPU), with one line naming the argument or file
on stderr (``fastprompt <command>: error: ...``); nothing half-written is left behind. An
unexpected error prints one line too and returns 1; ``--debug`` shows its traceback.
The only package that parses arguments: each module registers its commands on one parser.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fastprompt.cli import deploy, protocols, training


def _user_errors() -> tuple[type, ...]:
    from PIL import Image

    from fastprompt._io import LockedError
    return (ValueError, TypeError, OSError, LockedError, RecursionError,
            Image.DecompressionBombError)


_COMMAND_MODULES = (training, deploy, protocols)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first non-option word), if it is one."""
    known = {name for module in _COMMAND_MODULES for name in module.COMMANDS}
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in known else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only the module that owns it registers its commands, so
    that ``predict`` builds without importing torch (the training commands' defaults live in
    torch-importing modules)."""
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMAND_MODULES:
        if command is None or command in module.COMMANDS:
            module.add_commands(sub)
    for command in sub.choices.values():  # also accepted after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks of errors")
    return parser


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if isinstance(error, RecursionError):
        return "input nested too deeply (RecursionError)"
    return str(error) or type(error).__name__


class _DropOpenClipRandomWarning(logging.Filter):
    # open_clip warns "No pretrained weights loaded" for random models; fastprompt says it itself.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_DropOpenClipRandomWarning())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastprompt {args.command}: interrupted (finished epochs are kept; --resume "
              "continues)", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, _user_errors()):
            print(f"fastprompt {args.command}: error: {_message(e)}", file=sys.stderr)
            return 2
        print(f"fastprompt {args.command}: unexpected error: {type(e).__name__}: {_message(e)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
