"""Evaluation on other classes and other data: CoOp/Dassl's base/new class halves, ``eval --data``
(cross-dataset: other images, other class names), ``eval --base-to-new`` and the refusal of
class-specific contexts."""
import json
import os
import random

import pytest
import torch
from PIL import Image

from fastprompt.cli import main
from fastprompt.data import DatasetSplits, few_shot_subset, load_dataset, make_shapes_dataset
from fastprompt.data.source import DataSource, base_new_classes, subsample_classes
from fastprompt.protocols.stats import harmonic_mean

RENAMED = {"red_circle": "crimson_disc", "green_square": "olive_box", "blue_triangle": "navy_wedge",
           "yellow_diamond": "amber_rhombus"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    """Data set A (6 shape classes), data set B (4 of them under other class names, other
    images), and the tiny model's weights as a checkpoint file."""
    root = tmp_path_factory.mktemp("protocols")
    make_shapes_dataset(root / "a", num_classes=6, images_per_class=4, test_images_per_class=3,
                        seed=9)
    make_shapes_dataset(root / "b", num_classes=4, images_per_class=2, test_images_per_class=3,
                        seed=21)
    for split in ("train", "test"):
        for old, new in RENAMED.items():
            os.rename(root / "b" / split / old, root / "b" / split / new)
    os.link(tiny_weights, root / "tiny.safetensors")
    return root


def _train(world, out, *extra):
    argv = ["train", "--pretrained", str(world / "tiny.safetensors"), "--data", str(world / "a"),
            "--views", "2", "--out", str(out), "--epochs", "3", "--n-ctx", "4", "--lr", "0.05",
            "--no-progress", *extra]
    assert main(argv) == 0


def _json(argv, capsys):
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _recompute(run_dir, data_root, classnames, subsample="all"):
    """Predictions computed here from scratch: the run's ctx in front of ``classnames`` through
    the text tower, and the data's test images through the image tower."""
    from fastprompt.models import PromptedTextModel, create_model
    from fastprompt.train import read_prompt
    ctx, config, _, _ = read_prompt(run_dir)
    model, _, preprocess, tokenizer = create_model(config.model, config.pretrained)
    prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=config.n_ctx)
    with torch.no_grad():
        prompted.prompt_learner.ctx.copy_(ctx)
        text = torch.nn.functional.normalize(prompted().float(), dim=-1)
    splits = subsample_classes(load_dataset(data_root, seed=config.seed), subsample)
    assert splits.classnames == classnames
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in splits.test])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    labels = torch.tensor([y for _, y in splits.test])
    correct = (feats @ text.t()).argmax(1) == labels
    per_class = [float(correct[labels == c].float().mean()) for c in range(len(classnames))]
    return float(correct.float().mean()), per_class


def test_base_and_new_halves_follow_dassl(seed):
    """Labels sorted, the first ceil(C/2) base, the rest new, each relabelled from 0, in every
    split; the few-shot draw of a class does not depend on the half it is trained in."""
    rng = random.Random(seed)
    c = rng.randint(2, 9)
    names = [f"class {i}" for i in range(c)]
    train = [(f"/x/train/{y}/{k}.png", y) for y in range(c) for k in range(rng.randint(3, 6))]
    test = [(f"/x/test/{y}/{k}.png", y) for y in range(c) for k in range(2)]
    rng.shuffle(train)
    splits = DatasetSplits(names, train, test, test[:3], "/x")
    base, new = base_new_classes(c)
    assert len(base) == (c + 1) // 2 and list(base) + list(new) == list(range(c))
    for half, labels in (("base", base), ("new", new)):
        sub = subsample_classes(splits, half)
        assert sub.classnames == [names[i] for i in labels]
        for part, full in ((sub.train, train), (sub.test, test), (sub.val, test[:3])):
            assert part == [(p, labels.index(y)) for p, y in full if y in labels]
    shots = 3
    everything = few_shot_subset(train, shots, seed=seed)
    for half, labels in (("base", base), ("new", new)):
        sub = subsample_classes(splits, half, shots=shots, seed=seed)
        assert sorted(p for p, _ in sub.train) == sorted(p for p, y in everything if y in labels)
        # The cache's own draw of ``shots`` out of ``shots`` keeps them all.
        assert sorted(few_shot_subset(sub.train, shots, seed=seed)) == sorted(sub.train)
    assert subsample_classes(splits, "all") is splits
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes(splits, "half")
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_eval_on_other_data_with_other_class_names(world, tmp_path, capsys):
    run = tmp_path / "run"
    _train(world, run)
    # Training draws its curves; `fastprompt plot` redraws them.
    curves = run / "curves.png"
    assert curves.stat().st_size > 0
    curves.unlink()
    assert main(["plot", str(run)]) == 0 and curves.stat().st_size > 0
    assert main(["plot", str(world / "b")]) == 2
    assert "metrics.json" in capsys.readouterr().err
    names_b = load_dataset(world / "b").classnames
    assert set(names_b) == {n.replace("_", " ") for n in RENAMED.values()}
    result = _json(["eval", str(run), "--data", str(world / "b"), "--no-progress"], capsys)
    acc, per_class = _recompute(run, world / "b", names_b)
    assert [p["class"] for p in result["per_class"]] == names_b
    assert result["test_acc"] == pytest.approx(acc)
    assert [p["accuracy"] for p in result["per_class"]] == pytest.approx(per_class)
    assert result["num_test_images"] == 12 and result["num_classes"] == 4
    # The test-only cache is kept and reused while the images and the model are unchanged.
    cache = result["cache"]
    stamp = os.stat(cache).st_mtime_ns
    again = _json(["eval", str(run), "--data", str(world / "b"), "--no-progress"], capsys)
    assert again["test_acc"] == result["test_acc"] and os.stat(cache).st_mtime_ns == stamp
    # The run's own data through the same path gives the run's own test accuracy.
    own = _json(["eval", str(run), "--data", str(world / "a"), "--no-progress"], capsys)
    metrics = json.loads((run / "metrics.json").read_text())
    assert own["test_acc"] == pytest.approx(metrics["test_acc"])


def test_class_specific_contexts_do_not_transfer(world, tmp_path, capsys):
    run = tmp_path / "csc"
    _train(world, run, "--class-specific")
    assert main(["eval", str(run), "--data", str(world / "b"), "--no-progress"]) == 2
    assert "class-specific" in capsys.readouterr().err
    # Other images of the same classes are fine (domain shift).
    own = _json(["eval", str(run), "--data", str(world / "a"), "--no-progress"], capsys)
    assert own["num_classes"] == 6


def test_base_to_new(world, tmp_path, capsys):
    run = tmp_path / "base"
    _train(world, run, "--subsample", "base")
    all_names = load_dataset(world / "a").classnames
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["data"]["subsample"] == "base"
    assert DataSource.from_dict(metrics["data"]).root == str(world / "a")
    result = _json(["eval", str(run), "--base-to-new", "--no-progress"], capsys)
    assert [p["class"] for p in result["base"]["per_class"]] == all_names[:3]
    assert [p["class"] for p in result["new"]["per_class"]] == all_names[3:]
    assert result["base_acc"] == pytest.approx(metrics["test_acc"])
    new_acc, new_per_class = _recompute(run, world / "a", all_names[3:], "new")
    assert result["new_acc"] == pytest.approx(new_acc)
    assert [p["accuracy"] for p in result["new"]["per_class"]] == pytest.approx(new_per_class)
    assert result["hm"] == pytest.approx(harmonic_mean(result["base_acc"], new_acc))
    text = main(["eval", str(run), "--base-to-new", "--no-progress"])
    assert text == 0 and "H = 2BN/(B+N)" in capsys.readouterr().out
    # Three classes leave one new class: no classifier, a clear error.
    make_shapes_dataset(tmp_path / "three", num_classes=3, images_per_class=1, seed=2)
    assert main(["eval", str(run), "--data", str(tmp_path / "three"), "--subsample", "new",
                 "--no-progress"]) == 2
    assert "at least 4 classes" in capsys.readouterr().err

    whole = tmp_path / "whole"
    _train(world, whole)
    assert main(["eval", str(whole), "--base-to-new", "--no-progress"]) == 2
    assert "--subsample base" in capsys.readouterr().err


def test_export_with_other_class_names_matches_torch(world, tmp_path, capsys):
    from fastprompt.serve import OnnxClassifier
    from fastprompt.train import load_run
    from fastprompt.train.transfer import with_classnames
    run = tmp_path / "run"
    _train(world, run)
    names_b = load_dataset(world / "b").classnames
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names_b) + "\n\n")
    export = tmp_path / "export"
    assert main(["export", str(run), str(export), "--classnames", str(names_file),
                 "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "4 classes" in out and "passed" in out
    classifier = OnnxClassifier(str(export))
    images = [p for p, _ in load_dataset(world / "b").test]
    ort = torch.from_numpy(classifier.predict_proba(images)).double()

    transferred = with_classnames(load_run(run), names_b)
    assert transferred.class_names == names_b
    preprocess = transferred.preprocess_val
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(transferred.model.encode_image(x).float(), dim=-1)
        text = torch.nn.functional.normalize(transferred.text_features, dim=-1)
        probs = (transferred.scale * feats @ text.t()).softmax(-1).double()
    assert (ort - probs).abs().max() < 1e-4
    assert main(["predict", str(export), images[0], "--top-k", "4", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert sorted(t["class"] for t in top) == sorted(names_b)

    csc = tmp_path / "csc"
    _train(world, csc, "--class-specific")
    assert main(["export", str(csc), str(tmp_path / "no"), "--classnames", str(names_file)]) == 2
    assert "class-specific" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "no")
    names_file.write_text("only one\n")
    assert main(["export", str(run), str(tmp_path / "no"), "--classnames", str(names_file)]) == 2
    assert "at least 2" in capsys.readouterr().err
