"""The command line end to end (cache, train, resume, eval, export, predict, demo) and its
handling of bad input: a clear message, exit code 2, nothing half-written."""
import json
import os
import re

import pytest
from PIL import Image

from fastprompt.cli import main
from fastprompt.data import make_shapes_dataset


def test_cache_train_eval_export_predict(cli_world, cli_args, tmp_path, capsys):
    cache = tmp_path / "c.safetensors"
    assert main(["cache", *cli_args, "--out", str(cache)]) == 0
    assert "3 classes, 12 training images x 2 views" in capsys.readouterr().out

    run = tmp_path / "run"
    argv = ["train", *cli_args, "--cache", str(cache), "--out", str(run), "--epochs", "2",
            "--method", "dspt", "--targets", "csl", "--alternate", "--prograd", "--n-ctx", "4",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dspt+csl(alt)+prograd: test accuracy" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["config"]["prograd"] is True
    assert os.path.isfile(run / "prompt.safetensors") and os.path.isfile(run / "checkpoint.pt")

    # A finished run resumes to the same result; without --resume the folder is refused.
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]
    capsys.readouterr()

    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc"] == pytest.approx(metrics["test_acc"])
    assert result["num_test_images"] == 6

    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    assert "passed" in capsys.readouterr().out
    image = sorted((cli_world / "shapes" / "test").rglob("*.png"))[0]
    assert main(["predict", str(export), str(image), "--top-k", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert len(top) == 2 and top[0]["class"] in metrics_classes(run)


def metrics_classes(run):
    from fastprompt.train import read_prompt
    return read_prompt(run)[2]


def test_cache_only_train(cli_world, cli_args, tmp_path, capsys):
    """`train --cache FILE` without --data trains on a cache built earlier."""
    cache = tmp_path / "c.safetensors"
    assert main(["cache", *cli_args, "--out", str(cache)]) == 0
    assert main(["train", "--pretrained", str(cli_world / "tiny.safetensors"), "--cache", str(cache),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"]) == 0


def _expect_error(argv, capsys, pattern, out_dir=None):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err, err
    if out_dir is not None:
        assert not os.path.exists(os.path.join(out_dir, "prompt.safetensors"))
        assert not os.path.exists(os.path.join(out_dir, "metrics.json"))
    return err


def test_bad_data(cli_world, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    run = tmp_path / "run"
    base = ["train", "--pretrained", str(cli_world / "tiny.safetensors"), "--out", str(run),
            "--epochs", "1", "--no-progress"]
    _expect_error(base + ["--data", str(empty)], capsys, "fastprompt train: error:", run)

    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(one / "cat" / f"{i}.png")
    err = _expect_error(base + ["--data", str(one)], capsys, "fastprompt train: error:", run)
    assert "class" in err

    _expect_error(base + ["--data", str(cli_world / "shapes"), "--shots", "50"], capsys, "shots", run)
    _expect_error(base + ["--data", str(tmp_path / "missing")], capsys, "missing", run)


def test_corrupt_images_are_skipped_with_a_count(cli_world, tmp_path, capsys):
    data = tmp_path / "data"
    for cls in ("red", "blue"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (200 if cls == "red" else 0, 0, 40 * i)).save(data / cls / f"{i}.png")
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["cache", "--pretrained", str(cli_world / "tiny.safetensors"), "--data", str(data),
                 "--views", "1", "--out", str(tmp_path / "c.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "2 classes, 4 training images" in out  # 5 readable, 20% test
    # The warning is one line of the fastprompt logger, not Python's two-line UserWarning.
    warned = [line for line in err.splitlines() if "unreadable" in line]
    assert len(warned) == 1 and re.match(r"fastprompt: skipped 1 unreadable image.*broken.png",
                                         warned[0])
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_bad_checkpoint_and_cache(cli_world, cli_args, tmp_path, capsys):
    cache = tmp_path / "c.safetensors"
    assert main(["cache", *cli_args, "--out", str(cache)]) == 0
    cache.write_bytes(cache.read_bytes()[:500])
    _expect_error(["train", "--pretrained", str(cli_world / "tiny.safetensors"), "--cache", str(cache),
                   "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"], capsys,
                  "c.safetensors", tmp_path / "run")
    # A cache from another model is refused.
    assert main(["cache", *cli_args, "--out", str(cache)]) == 0
    _expect_error(["train", "--model", "ViT-B-32", "--cache", str(cache), "--out",
                   str(tmp_path / "run2"), "--epochs", "1", "--no-progress"], capsys,
                  "was built with model 'fastprompt-tiny'", tmp_path / "run2")
    _expect_error(["eval", str(tmp_path / "nowhere")], capsys, "has no trained prompt")
    (tmp_path / "unfinished").mkdir()
    _expect_error(["export", str(tmp_path / "unfinished"), str(tmp_path / "exp")], capsys,
                  "has no trained prompt")
    assert not (tmp_path / "exp" / "model.onnx").exists()
    _expect_error(["train", *cli_args, "--out", str(tmp_path / "r"), "--lam", "-1"], capsys,
                  "lam: must be non-negative")
    _expect_error(["train", "--pretrained", str(tmp_path / "nope.pt"), "--data", str(cli_world / "shapes"),
                   "--out", str(tmp_path / "r")], capsys, "nope.pt")


def test_demo(tmp_path, capsys):
    from fastprompt.demo import DEMO_METHODS
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("method")) + 1:]
    assert table[0].startswith("zero-shot")
    assert [row.split()[0] for row in table[1:len(DEMO_METHODS) + 1]] == [m for m, _ in DEMO_METHODS]
    assert "passed" in out and "max |probs(torch) - probs(onnxruntime)|" in out


def test_demo_never_deletes_what_it_did_not_create(tmp_path):
    """A run folder of the demo's from other settings is retrained in place; a folder the demo
    did not make, or one holding other files, is refused and left as it was (issue 14, 9)."""
    from fastprompt.demo import DEMO_MARKER, _train
    from fastprompt.train import RunMismatchError

    calls = []

    def train(run_dir, *, resume=False, progress=False):
        calls.append(resume)
        if resume and os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            raise RunMismatchError("resume: checkpoint belongs to a different run")
        with open(os.path.join(run_dir, "checkpoint.pt"), "w") as f:
            f.write("new")
        return {"ok": True}

    foreign = tmp_path / "runs" / "coop"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not made by the demo"):
        _train(train, str(foreign), progress=False)
    assert os.listdir(foreign) == ["notes.txt"] and calls == []

    ours = tmp_path / "demo" / "runs" / "coop"
    assert _train(train, str(ours), progress=False) == {"ok": True}
    assert (ours / DEMO_MARKER).exists()
    (ours / "metrics.json").write_text("{}")
    assert _train(train, str(ours), progress=False) == {"ok": True}  # other settings: retrained
    assert (ours / "checkpoint.pt").read_text() == "new" and not (ours / "metrics.json").exists()
    (ours / "notes.txt").write_text("a file the demo did not write")
    with pytest.raises(ValueError, match="files the demo did not write .*notes.txt"):
        _train(train, str(ours), progress=False)
    assert (ours / "notes.txt").exists() and (ours / "checkpoint.pt").exists()
