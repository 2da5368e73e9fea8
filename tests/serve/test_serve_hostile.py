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

from fastprompt._checks import printable
from onnxlib import CLASS_NAMES


def predict(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "fastprompt", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def tampered(tiny_export, tmp_path):
    """``tampered(**values)``: a copy of the tiny export whose ``fastprompt.<key>`` metadata
    entries hold ``values`` (JSON-encoded unless a str), as a model file from elsewhere may."""
    import onnx  # the test's tool, not serving's

    def make(**values):
        model = onnx.load(str(tiny_export[0] / "model.onnx"))
        for entry in model.metadata_props:
            key = entry.key.removeprefix("fastprompt.")
            if key in values:
                value = values[key]
                entry.value = value if isinstance(value, str) else json.dumps(value)
        path = tmp_path / f"tampered-{len(list(tmp_path.glob('tampered-*')))}.onnx"
        onnx.save(model, str(path))
        return path
    return make


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


def test_text_output_escapes_hostile_names(tiny_export, image_files, tampered, tmp_path):
    """Class names from a model's metadata and image file names are shown with their control
    characters escaped: no ESC sequence reaches the terminal, no newline forges a result line;
    --jsonl keeps them exactly (JSON escapes them). Issue 23, item 3."""
    names = ["cat\x1b[2J", "dog\u202egnp.exe", "a\nb", "\x07bell", "zero\u200bwidth", "tab\t",
             "ok"]
    assert len(names) == len(CLASS_NAMES)
    model = tampered(class_names=names)
    evil = tmp_path / "x\n  0.9999  forged\x1b[31m.png"
    os.link(image_files[0], evil)
    proc = predict(model, evil, "--top-k", len(names))
    assert proc.returncode == 0, proc.stderr
    for bad in ("\x1b", "\u202e", "\x07", "\u200b", "\t"):
        assert bad not in proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 + len(names)
    assert lines[0] == printable(str(evil)) and lines[0].endswith("forged\\x1b[31m.png")
    assert sorted(line.split(None, 1)[1] for line in lines[1:]) == sorted(
        printable(n) for n in names)
    rows = [json.loads(line) for line in predict(model, evil, "--jsonl", "--top-k", len(names)
                                                 ).stdout.splitlines()]
    assert rows[0]["image"] == str(evil)
    assert sorted(t["class"] for t in rows[0]["top_k"]) == sorted(names)
    # Errors too: the one line on stderr stays one line.
    missing = tmp_path / "gone\n\x1b[2J.png"
    proc = predict(model, missing)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "\x1b" not in proc.stderr and "gone\\n\\x1b[2J.png" in proc.stderr


@pytest.mark.parametrize("values, fragments", [
    (dict(image_size=[100000, 100000]), ["image_size [100000, 100000]", "64 x 64"]),
    (dict(image_size=[-5, 0]), ["image_size", "positive"]),
    (dict(image_size=[64]), ["image_size"]),
    (dict(class_names=["a", "b"]), ["2 class names", "7 scores"]),
    (dict(class_names=CLASS_NAMES + ["extra"]), ["8 class names", "7 scores"]),
    (dict(mean=[0.5]), ["mean"]),
    (dict(std=[0.0, 1.0, 1.0]), ["std"]),
])
def test_metadata_that_disagrees_with_the_graph_is_refused(tampered, image_files, values,
                                                            fragments):
    """The metadata is checked against the graph's dimensions when the model is opened: a
    mismatch is refused by name instead of growing memory without bound, IndexError,
    ZeroDivisionError or a multi-line onnxruntime error (issue 23, item 7)."""
    model = tampered(**values)
    proc = predict(model, image_files[0])
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"fastprompt predict: error: model: {model}")
    for fragment in fragments:
        assert fragment in proc.stderr
