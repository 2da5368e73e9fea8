"""``fastprompt predict`` and ``OnnxClassifier`` under hostile input (issue 23): files that are
not regular files, names that would act on a terminal, model metadata that disagrees with the
graph, and a reader that goes away. Run as a user would (subprocesses, with a timeout so that a
hang fails the test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def predict(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "fastprompt", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_a_fifo_in_a_folder_is_skipped_and_listed(tiny_export, image_files, tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    os.link(image_files[0], folder / "a.png")
    os.mkfifo(folder / "b.jpg")
    proc = predict(tiny_export[0], folder, "--jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(folder / "a.png")]
    assert "b.jpg" in proc.stderr and "not a regular file" in proc.stderr


def test_a_named_fifo_is_refused(tiny_export, image_files, tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    proc = predict(tiny_export[0], image_files[0], fifo)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fastprompt predict: error: ")
    assert len(proc.stderr.splitlines()) == 1 and "x.jpg" in proc.stderr
    assert "a FIFO, not a regular file" in proc.stderr
    proc = predict(tiny_export[0], image_files[0], fifo, "--jsonl", "--skip-unreadable")
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "top_k" in rows[0] and "not a regular file" in rows[1]["error"]
