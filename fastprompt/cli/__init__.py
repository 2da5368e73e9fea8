"""fastprompt command line: cache, train, eval, demo, export, predict, sweep, plot, import-dassl.

Every command returns 0 on success and 2 on bad input or an anticipated failure (a damaged or
locked file, a full or read-only disk, a missing GPU), with one line naming the argument or file
on stderr (``fastprompt <command>: error: ...``); nothing half-written is left behind. A command
whose own check refused its result (an export that disagrees with torch) or that finished with
some items failed (unreadable images, failed runs of a sweep) returns 1, as does an unexpected
error, in one line too (``--debug`` shows its traceback); an interrupt returns 130. When the
reader of the output goes away (``fastprompt predict ... | head``), the command stops quietly
with 141, the status of a Unix tool killed by SIGPIPE. ``main`` alone turns errors into these
exit codes: the command modules raise.

One module per command group registers its commands on one parser; they are imported by the
command named, so that ``fastprompt predict`` (``cli/predict.py``: onnxruntime, numpy, Pillow)
never loads torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
import warnings

from PIL import Image

from fastprompt._checks import CheckFailed, printable
from fastprompt._io import LockedError


class PartlyFailed(Exception):
    """The command finished, but some of its items failed (each said above it): exit 1."""


# command -> the module that registers it
COMMAND_MODULES = {
    "cache": "fastprompt.cli.cache",
    "train": "fastprompt.cli.train",
    "eval": "fastprompt.cli.evaluate",
    "demo": "fastprompt.cli.demo",
    "export": "fastprompt.cli.deploy",
    "predict": "fastprompt.cli.predict",
    "sweep": "fastprompt.cli.protocols",
    "plot": "fastprompt.cli.protocols",
    "import-dassl": "fastprompt.cli.dassl",
}

USER_ERRORS = (ValueError, TypeError, OSError, ImportError, LockedError, RecursionError,
               Image.DecompressionBombError)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first non-option word), if it is one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMAND_MODULES else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only the module that owns it registers its commands."""
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    names = [COMMAND_MODULES[command]] if command else dict.fromkeys(COMMAND_MODULES.values())
    for name in names:
        # Imported here, by command: the training commands' modules import torch.
        importlib.import_module(name).add_commands(sub)
    for subparser in sub.choices.values():  # also accepted after the command's name
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show tracebacks of errors")
    return parser


def _message(error: BaseException) -> str:
    """The error's one line, its non-printable characters escaped (a file or class name may
    hold a newline or an ESC sequence)."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return printable(f"{error.strerror}{where}")
    if isinstance(error, RecursionError):
        return "input nested too deeply (RecursionError)"
    return printable(str(error) or type(error).__name__)


# The exit status of a process killed by SIGPIPE, as a shell reports it (128 + 13).
BROKEN_PIPE_STATUS = 141


def _stdout_gone() -> bool:
    """Whether the reader of standard output went away (a closed pipe or socket)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:  # nothing was pending: ask the file itself (a pipe without reader polls as an error)
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is still
    buffered neither fails nor prints a warning."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class _DropOpenClipRandomWarning(logging.Filter):
    # open_clip warns "No pretrained weights loaded" for random models; fastprompt says it itself.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of the fastprompt logger, instead of Python's format (the file,
    line number and category, then the source line)."""
    text = printable(str(message))
    logging.getLogger("fastprompt").warning(
        "%s", text if text.startswith("fastprompt") else f"fastprompt: warning: {text}")


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
        with warnings.catch_warnings():  # restored when the command ends (main may be called again)
            warnings.showwarning = _warning_line
            args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return 0
    except KeyboardInterrupt:
        print(f"fastprompt {args.command}: interrupted (finished epochs are kept; --resume "
              "continues)", file=sys.stderr)
        return 130
    except PartlyFailed as e:
        print(f"fastprompt {args.command}: {printable(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_gone():
            # `fastprompt predict ... | head`: the reader has what it wanted; stop as Unix tools
            # do, without a message.
            _quiet_stdout()
            return BROKEN_PIPE_STATUS
        if getattr(args, "debug", False):
            raise
        if isinstance(e, CheckFailed):
            print(f"fastprompt {args.command}: error: {_message(e)}", file=sys.stderr)
            return 1
        if isinstance(e, USER_ERRORS):
            print(f"fastprompt {args.command}: error: {_message(e)}", file=sys.stderr)
            return 2
        print(f"fastprompt {args.command}: unexpected error: {type(e).__name__}: {_message(e)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
