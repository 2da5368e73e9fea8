"""``fastprompt predict``: its output (text, --json, --jsonl, progress), folders and list files,
unreadable images and damaged models, and its exit codes."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fastprompt.serve import OnnxClassifier
from onnxlib import random_image


def test_cli_predict(cli, tiny_export, image_files, capsys):
    model = str(tiny_export[0] / "model.onnx")
    files = [str(p) for p in image_files[:2]]
    assert cli(["predict", model, *files, "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = OnnxClassifier(model).predict(files, top_k=2)
    assert [o["image"] for o in out] == files
    for o, pred in zip(out, expected):
        assert [t["class"] for t in o["top_k"]] == [c for c, _ in pred]
        assert [t["prob"] for t in o["top_k"]] == pytest.approx([p for _, p in pred], abs=1e-6)
    assert cli(["predict", model, files[0], "--top-k", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == files[0] and text[1].split(None, 1)[1] == expected[0][0][0]


@pytest.mark.parametrize("argv_tail, match", [
    (["{bad}"], "images: .*missing.png does not exist"),
    (["{img}", "--top-k", "0"], "--top-k: expected an int >= 1"),
])
def test_cli_predict_bad_input(cli, tiny_export, image_files, tmp_path, capsys, argv_tail,
                               match):
    argv = [a.format(bad=tmp_path / "missing.png", img=image_files[0]) for a in argv_tail]
    assert cli(["predict", str(tiny_export[0]), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastprompt predict: error: ")
    assert re.search(match, err)


def test_cli_predict_damaged_model(cli, tmp_path, image_files, capsys):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x0a\x3a\xff\xff")
    assert cli(["predict", str(tmp_path / "model.onnx"), str(image_files[0])]) == 2
    assert "model: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, session_seed):
    """100 generated images of odd sizes and modes in a nested folder (plus a non-image file)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(session_seed)
    for i in range(100):
        sub = root / f"part {i % 3}"
        sub.mkdir(exist_ok=True)
        w, h = (int(v) for v in rng.integers(20, 140, 2))
        mode = ("RGB", "L", "RGBA", "P")[i % 4]
        random_image(rng, w, h, mode).save(sub / f"{i:03d}.{'jpg' if mode in ('RGB', 'L') else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_predict_folder_streams_json_lines(cli, tiny_export, image_folder, capsys):
    model = str(tiny_export[0])
    assert cli(["predict", model, str(image_folder), "--jsonl", "--top-k", "3",
                "--batch-size", "16", "--progress"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 100
    rows = [json.loads(line) for line in lines]
    files = sorted(str(p) for p in image_folder.rglob("*") if p.suffix in (".jpg", ".png"))
    assert [r["image"] for r in rows] == files  # sorted, recursive, the text file skipped
    expected = OnnxClassifier(model).predict(files, top_k=3)
    for row, pred in zip(rows, expected):
        assert [t["class"] for t in row["top_k"]] == [c for c, _ in pred]
        assert [t["prob"] for t in row["top_k"]] == pytest.approx([p for _, p in pred], abs=1e-6)
    assert "predict: 100/100 images" in captured.err


def test_cli_predict_list_file_and_unreadable_images(cli, tiny_export, image_files, tmp_path,
                                                     capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    listing = tmp_path / "images.txt"
    listing.write_text(f"# two good, one broken\n{image_files[0]}\n\n{broken}\n{image_files[1]}\n")
    model = str(tiny_export[0])
    assert cli(["predict", model, "--list", str(listing), "--jsonl", "--skip-unreadable"]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["image"] for r in rows] == [str(image_files[0]), str(broken), str(image_files[1])]
    assert "top_k" in rows[0] and "top_k" in rows[2]
    assert "cannot read" in rows[1]["error"] and "broken.png" in rows[1]["error"]
    assert "1 of 3 images could not be read" in captured.err
    # Without --skip-unreadable the first unreadable image stops the run, naming it.
    assert cli(["predict", model, "--list", str(listing), "--jsonl"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli(["predict", model]) == 2
    assert "name image files or folders, or --list FILE" in capsys.readouterr().err
    assert cli(["predict", model, "--list", str(tmp_path / "none.txt")]) == 2
    assert "--list: " in capsys.readouterr().err
