"""``fastprompt.cli.main`` owns every exit code: the command modules raise, main maps."""
import subprocess
import sys

import pytest

import fastprompt.cli.cache
from fastprompt._checks import CheckFailed
from fastprompt._io import LockedError
from fastprompt.cli import COMMAND_MODULES, PartlyFailed, build_parser, main


@pytest.mark.parametrize("error, code, line", [
    (ValueError("--views: bad"), 2, "fastprompt cache: error: --views: bad"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"), 2,
     "fastprompt cache: error: No such file or directory: /x/y"),
    (LockedError("run folder 'r' is in use"), 2, "fastprompt cache: error: run folder 'r' is in use"),
    (ImportError("No module named 'open_clip'"), 2, "fastprompt cache: error: No module named"),
    (CheckFailed("parity failed"), 1, "fastprompt cache: error: parity failed"),
    (PartlyFailed("2 of 5 images could not be read"), 1,
     "fastprompt cache: 2 of 5 images could not be read"),
    (KeyboardInterrupt(), 130, "fastprompt cache: interrupted"),
    (ZeroDivisionError("boom"), 1, "fastprompt cache: unexpected error: ZeroDivisionError: boom"),
])
def test_errors_become_exit_codes(monkeypatch, capsys, error, code, line):
    def failing(args):
        raise error
    monkeypatch.setattr(fastprompt.cli.cache, "cmd_cache", failing)
    assert main(["cache", "--out", "x.safetensors"]) == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_debug_shows_the_traceback(monkeypatch):
    def failing(args):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(fastprompt.cli.cache, "cmd_cache", failing)
    with pytest.raises(ZeroDivisionError):
        main(["cache", "--out", "x.safetensors", "--debug"])


def test_every_command_has_its_module():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(COMMAND_MODULES)


def test_predict_parser_loads_no_torch():
    code = ("import sys; from fastprompt.cli import build_parser; build_parser('predict'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
