"""``fastprompt import-dassl`` and ``fastprompt export RUN OUT --dassl`` end to end: a checkpoint
written the way Dassl writes it (a scheduler object of a class not installed here) imports,
evaluates on a data folder, exports to ONNX with parity and predicts; ``--dassl`` then
``import-dassl`` gives the same classifier back; hostile, foreign and damaged files are refused in
one line with exit code 2."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from dasslib import Reduces, official_buffers, save_dassl_checkpoint
from fastprompt.cli import main
from fastprompt.train import load_run

N_CTX = 4


@pytest.fixture(scope="module")
def dassl_world(cli_world, tiny_clip, tmp_path_factory):
    """``cli_world``'s 3 classes as an official output folder: ``out/prompt_learner/
    model.pth.tar-5`` of a CoOp context (float16, as PREC fp16 saves it) with an optimiser state
    and a Dassl scheduler object, and its class names file as Dassl names them (underscores)."""
    root = tmp_path_factory.mktemp("dassl")
    folders = sorted(p.name for p in (cli_world / "shapes" / "train").iterdir())
    (root / "classnames.txt").write_text("\n".join(folders) + "\n")
    model, tokenizer = tiny_clip[0], tiny_clip[3]
    names = [f.replace("_", " ") for f in folders]
    prefix, suffix = official_buffers(model, tokenizer, names, N_CTX)
    ctx = (0.3 * torch.randn(N_CTX, 64, generator=torch.Generator().manual_seed(5))).half()
    (root / "out" / "prompt_learner").mkdir(parents=True)
    save_dassl_checkpoint(root / "out" / "prompt_learner" / "model.pth.tar-5",
                          {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix}, epoch=5,
                          val_result=66.7)
    return root


def import_args(cli_world, dassl_world, checkpoint, out):
    return ["import-dassl", str(checkpoint), "--learner", "coop", "--pretrained",
            str(cli_world / "tiny.safetensors"), "--classnames",
            str(dassl_world / "classnames.txt"), "--out", str(out)]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_import_eval_export_predict_and_back(cli_world, dassl_world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(import_args(cli_world, dassl_world, dassl_world / "out", run)) == 0
    out = capsys.readouterr().out
    assert "imported a CoOp prompt learner (4 tokens, float16, epoch 5) for 3 classes" in out
    assert "ignored: token_prefix, token_suffix" in out
    source = json.loads((run / "metrics.json").read_text())["imported_from"]
    assert source["token_suffix"] == "matches" and source["val_result"] == 66.7

    # Its own cache: there is none.
    assert main(["eval", str(run)]) == 2
    one_line_error(capsys, "imported from a Dassl checkpoint", "--cache", "--data")
    assert main(["eval", str(run), "--data", str(cli_world / "shapes"), "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_classes"] == 3 and result["num_test_images"] == 6
    assert 0.0 <= result["test_acc"] <= 1.0

    export = tmp_path / "onnx"
    assert main(["export", str(run), str(export)]) == 0
    assert "-> passed" in capsys.readouterr().out
    images = sorted(str(p) for p in (cli_world / "shapes" / "test").rglob("*.png"))
    assert main(["predict", str(export), *images, "--top-k", "3", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    classifier = load_run(run)
    with torch.no_grad():
        pixels = torch.stack([classifier.preprocess_val(Image.open(p).convert("RGB"))
                              for p in images])
        x = torch.nn.functional.normalize(classifier.model.encode_image(pixels), dim=-1)
        t = torch.nn.functional.normalize(classifier.text_features, dim=-1)
        expected = (classifier.scale * x @ t.T).softmax(-1)
    for entry, probs in zip(predicted, expected):
        for top in entry["top_k"]:
            c = classifier.class_names.index(top["class"])
            assert top["prob"] == pytest.approx(float(probs[c]), abs=1e-4)

    # The official file and back: the same classifier (its context was float16 already).
    assert main(["export", str(run), str(tmp_path / "dassl"), "--dassl"]) == 0
    captured = capsys.readouterr()
    assert "prompt_learner/model.pth.tar-5: a CoOp prompt learner (ctx 4x64; float16)" in \
        captured.out and "--load-epoch 5" in captured.out
    assert "note: fastprompt-tiny is not one of OpenAI's CLIP backbones" in captured.err
    assert main(import_args(cli_world, dassl_world, tmp_path / "dassl", tmp_path / "back")) == 0
    back = load_run(tmp_path / "back")
    assert torch.equal(back.text_features, classifier.text_features)
    assert back.class_names == classifier.class_names


def test_hostile_foreign_and_damaged_files_exit_2(cli_world, dassl_world, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran-code"
    hostile = tmp_path / "hostile.pth.tar"
    torch.save({"state_dict": Reduces(os.system, (f"touch {marker}",)), "epoch": 1}, hostile)
    truncated = tmp_path / "model.pth.tar-5"
    data = (dassl_world / "out" / "prompt_learner" / "model.pth.tar-5").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    foreign = tmp_path / "clip.pth.tar"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}, "epoch": 3}, foreign)
    for path, needles in ((hostile, ["not a Dassl checkpoint"]),
                          (truncated, ["is damaged or not a torch checkpoint"]),
                          (foreign, ["not a prompt learner's state"])):
        assert main(import_args(cli_world, dassl_world, path, tmp_path / "run")) == 2
        one_line_error(capsys, "fastprompt import-dassl: error: ", str(path), *needles)
        assert not (tmp_path / "run").exists()
    assert not marker.exists()

    assert main(import_args(cli_world, dassl_world, dassl_world / "out", tmp_path / "run")) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "x"), "--dassl", "--fp16"]) == 2
    one_line_error(capsys, "--dassl", "drop --fp16")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "x"), "--dassl",
                 "--classnames", str(dassl_world / "classnames.txt")]) == 2
    one_line_error(capsys, "drop --classnames")
    assert not (tmp_path / "x").exists()
