"""Fixtures of the serving tests. The exported model they serve (``tiny_export``), the images
(``image_files``) and the tiny model they are checked against come from the root conftest,
shared with tests/export."""
from __future__ import annotations

import argparse

import pytest

from fastprompt.cli.deploy import add_predict_parser


@pytest.fixture
def cli():
    """``cli(argv)``: ``fastprompt predict ...`` through its own parser; returns the exit code."""
    def run(argv):
        parser = argparse.ArgumentParser(prog="fastprompt")
        add_predict_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)
    return run
