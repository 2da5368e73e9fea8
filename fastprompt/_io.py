"""Atomic file placement: every file fastprompt writes (caches, checkpoints, prompts, metrics,
ONNX models, Triton configs) goes to a temporary name in the target folder and is renamed into
place, so a reader sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator


def _temp_path(final: str) -> str:
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(final) + ".", suffix=".tmp")
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and
    rename it to ``path``; when it fails, remove it."""
    tmp = _temp_path(os.fspath(path))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise


def atomic_write(path: str, writer: Callable) -> None:
    """``writer(f)`` into a binary file object; the result lands at ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer(f)


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def place_alias(source: str, path: str) -> str:
    """Make ``path`` hold the same bytes as ``source``: a hard link, or a copy where the file
    system refuses links. Returns ``"hardlink"`` or ``"copy"``.

    Hard links rather than symlinks: both names are ordinary files, so a model repository
    survives being copied, archived or mounted into a container on its own, and replacing one
    name later never leaves the other dangling.
    """
    tmp = _temp_path(path)
    os.remove(tmp)  # os.link needs a free name; mkstemp only reserved a unique one
    try:
        try:
            os.link(source, tmp)
            mode = "hardlink"
        except OSError:
            shutil.copyfile(source, tmp)
            mode = "copy"
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise
    return mode


def remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
