"""OnnxClassifier and the predict/export commands: images from files and PIL against open_clip's
own preprocessing and a float64 truth, top-k, batching, damaged or foreign ONNX files, unreadable
images, wrong shapes, and the CLI's output and exit codes."""
from __future__ import annotations

import argparse
import json
import re
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import fastprompt.serve
from exportlib import CLASS_NAMES, METHOD, SCALE, truth
from fastprompt.export import OnnxClassifier
from fastprompt.cli.deploy import add_export_parser, add_predict_parser


def test_serve_module_reexports():
    assert fastprompt.serve.OnnxClassifier is OnnxClassifier


def test_predict_files_and_pil_match_training_preprocessing(tiny, class_embeddings, tiny_export,
                                                           image_files):
    model, preprocess_val = tiny
    clf = OnnxClassifier(tiny_export[0], batch_size=2)  # the folder works too; 5 images, 3 chunks
    assert clf.provider == "CPUExecutionProvider"
    assert clf.class_names == CLASS_NAMES and clf.info.method == METHOD
    # open_clip's own transform on RGB images, as fastprompt.data loads them for training.
    x = torch.stack([preprocess_val(Image.open(p).convert("RGB")) for p in image_files])
    _, probs_true = truth(model.visual, class_embeddings, SCALE, x)
    probs = clf.predict_proba([str(p) for p in image_files])
    assert np.abs(probs - probs_true.numpy()).max() <= 1e-4
    pil = [Image.open(p).convert("RGB") for p in image_files]
    assert np.abs(clf.predict_proba(pil) - probs).max() <= 1e-6
    assert np.abs(clf.predict_proba(pil[3]) - probs[3:4]).max() <= 1e-6  # a single image

    top = clf.predict(image_files, top_k=3)
    assert len(top) == len(image_files)
    for row, pred in zip(probs_true.numpy(), top):
        order = np.argsort(-row)[:3]
        assert [c for c, _ in pred] == [CLASS_NAMES[i] for i in order]
        assert np.allclose([p for _, p in pred], row[order], atol=1e-4)
    assert len(clf.predict(image_files[:1], top_k=100)[0]) == len(CLASS_NAMES)


def test_predict_array_single_and_batched_agree(tiny_export, seed):
    x = np.random.default_rng(seed).standard_normal((9, 3, 64, 64)).astype(np.float32)
    whole = OnnxClassifier(tiny_export[0], batch_size=32).predict_proba(x)
    chunked = OnnxClassifier(tiny_export[0], batch_size=4).predict_proba(x)
    single = OnnxClassifier(tiny_export[0]).predict_proba(x[4])  # 3 x H x W: one image
    assert np.abs(whole - chunked).max() <= 1e-6
    assert np.abs(single - whole[4:5]).max() <= 1e-6
    assert np.allclose(whole.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((2, 1, 64, 64), np.float32), ValueError, r"images: expected 3 channels .* got 1"),
    (np.zeros((2, 3, 32, 32), np.float32), ValueError, r"images: expected preprocessed images 3 x 64 x 64"),
    (np.zeros((2, 64, 64, 3), np.float32), ValueError, r"images: expected 3 channels"),
    (np.zeros((64, 64), np.float32), ValueError, r"images: expected preprocessed images"),
    (np.zeros((0, 3, 64, 64), np.float32), ValueError, r"images: empty batch"),
    (np.zeros((1, 3, 64, 64), np.uint8), TypeError, r"images: expected a float array"),
    (np.full((1, 3, 64, 64), np.nan, np.float32), ValueError, r"images: contains NaN"),
    ([], ValueError, r"images: empty list"),
    ([3.0], TypeError, r"images\[0\]: expected a path or a PIL image"),
    (42, TypeError, r"images: expected paths, PIL images or an array"),
])
def test_bad_images(tiny_export, images, error, match):
    with pytest.raises(error, match=match):
        OnnxClassifier(tiny_export[0]).predict(images)


def test_unreadable_image_files(tiny_export, image_files, tmp_path):
    clf = OnnxClassifier(tiny_export[0])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image_files[0].read_bytes()[:200])
    for bad in (text, truncated, tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=r"images: .*" + bad.name):
            clf.predict([image_files[1], bad])


def _damaged_copies(path, folder, seed):
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    flipped = bytearray(data)
    flipped[:64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()  # header scrambled
    variants = {"empty.onnx": b"", "truncated.onnx": data[: len(data) // 2],
                "noise.onnx": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                "flipped.onnx": bytes(flipped), "text.onnx": b"hello, I am not a model\n"}
    for name, content in variants.items():
        (folder / name).write_bytes(content)
        yield folder / name


def test_damaged_model_files(tiny_export, tmp_path, seed):
    for bad in _damaged_copies(tiny_export[0] / "model.onnx", tmp_path, seed):
        with pytest.raises(ValueError, match=r"model: .*" + bad.name):
            OnnxClassifier(bad)
    with pytest.raises(ValueError, match=r"model: .*nowhere.onnx does not exist"):
        OnnxClassifier(tmp_path / "nowhere.onnx")


def test_foreign_onnx_model(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, producer_name="someone else"), str(path))
    with pytest.raises(ValueError, match=r"model: .*other.onnx is an ONNX model but not a fastprompt"):
        OnnxClassifier(path)


def test_damaged_metadata(tiny_export, tmp_path):
    model = onnx.load(str(tiny_export[0] / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "fastprompt.class_names":
            p.value = "[1, 2"
    onnx.save(model, str(tmp_path / "meta.onnx"))
    with pytest.raises(ValueError, match=r"model: .*meta.onnx has damaged fastprompt metadata"):
        OnnxClassifier(tmp_path / "meta.onnx")


def test_explicit_cuda_without_gpu_raises(tiny_export):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises((ValueError, RuntimeError), match=r"providers: .*CUDAExecutionProvider"):
        OnnxClassifier(tiny_export[0], ["CUDAExecutionProvider"])


# ----- command line ------------------------------------------------------------------------------


def cli(argv):
    parser = argparse.ArgumentParser(prog="fastprompt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_predict_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_predict(tiny_export, image_files, capsys):
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
def test_cli_predict_bad_input(tiny_export, image_files, tmp_path, capsys, argv_tail, match):
    argv = [a.format(bad=tmp_path / "missing.png", img=image_files[0]) for a in argv_tail]
    assert cli(["predict", str(tiny_export[0]), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastprompt predict: error: ")
    assert re.search(match, err)


def test_cli_predict_damaged_model(tmp_path, image_files, capsys):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x0a\x3a\xff\xff")
    assert cli(["predict", str(tmp_path / "model.onnx"), str(image_files[0])]) == 2
    assert "model: " in capsys.readouterr().err


def test_cli_export_from_run(class_embeddings, tiny, tmp_path, monkeypatch, capsys):
    # fastprompt.train.load_run is written elsewhere; stand in for it with the documented fields.
    from fastprompt import pipeline
    run = types.SimpleNamespace(model=tiny[0], model_name="fastprompt-tiny", class_names=CLASS_NAMES,
                                text_features=class_embeddings, scale=SCALE, method=METHOD,
                                run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(pipeline, "load_run", lambda run_dir: run)
    out = tmp_path / "export"
    assert cli(["export", run.run_dir, str(out), "--head-only", "--triton-name", "clf"]) == 0
    stdout = capsys.readouterr().out
    assert "tolerance: probs atol 0.0001" in stdout and "passed" in stdout
    clf = OnnxClassifier(out / "clf" / "1" / "model.onnx")
    assert clf.info.input_kind == "features" and clf.info.method == METHOD
    assert clf.info.image_size == (64, 64)  # the run's model supplied the preprocessing

    def missing_run(run_dir):
        raise ValueError(f"run_dir: {run_dir} has no checkpoint")

    monkeypatch.setattr(pipeline, "load_run", missing_run)
    assert cli(["export", "nowhere", str(out)]) == 2
    assert "run_dir: nowhere has no checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, session_seed):
    """100 generated images of odd sizes and modes in a nested folder (plus a non-image file)."""
    from exportlib import random_image
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


def test_cli_predict_folder_streams_json_lines(tiny_export, image_folder, capsys):
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


def test_cli_predict_list_file_and_unreadable_images(tiny_export, image_files, tmp_path, capsys):
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


def test_iter_predict_matches_predict(tiny_export, image_files):
    clf = OnnxClassifier(tiny_export[0], batch_size=2)
    streamed = list(clf.iter_predict([str(p) for p in image_files], top_k=2))
    assert [s[0] for s in streamed] == [str(p) for p in image_files]
    assert [s[1] for s in streamed] == clf.predict(image_files, top_k=2)
    assert all(s[2] is None for s in streamed)
