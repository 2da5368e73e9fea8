"""Fixtures of the export tests: the export command's parser, and a shapes data set with the
tiny model's weights for runs trained through the CLI. (The tiny model, its class embeddings and
one float32 export of it are in the root conftest, shared with tests/serve.)"""
from __future__ import annotations

import argparse
import os

import pytest

from fastprompt.cli.deploy import add_export_parser
from fastprompt.data import make_shapes_dataset


@pytest.fixture
def cli():
    """``cli(argv)``: ``fastprompt export ...`` through its own parser; returns the exit code."""
    def run(argv):
        parser = argparse.ArgumentParser(prog="fastprompt")
        add_export_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    """A shapes data set and the tiny model's weights as a local checkpoint file (as the CLI
    tests in tests/test_cli.py build them)."""
    root = tmp_path_factory.mktemp("cli")
    make_shapes_dataset(root / "shapes", num_classes=3, images_per_class=4,
                        test_images_per_class=2, seed=9)
    os.link(tiny_weights, root / "tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def world_args(world):
    """The ``cache``/``train`` arguments naming ``world``'s weights and data."""
    return ["--pretrained", str(world / "tiny.safetensors"), "--data", str(world / "shapes"),
            "--views", "2"]
