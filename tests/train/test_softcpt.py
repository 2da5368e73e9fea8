"""SoftCPT training over several tasks: mixed batches with per-task losses, metrics, exact
resume, export of one task, and bad input refused before anything is written."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.cli import main
from fastprompt.data.tasks import make_shapes_tasks, read_tasks_file
from fastprompt.pipeline import export_run
from fastprompt.train import (Task, TrainConfig, epoch_order, load_run, train_run,
                              train_softcpt_run)
from fastprompt.train import softcpt as softcpt_module
from fastprompt.train.files import read_prompt_file
from fastprompt.train.objective import Objective


def trained_tensors(run_dir):
    return read_prompt_file(run_dir).tensors


@pytest.fixture(scope="module")
def setup(cached_shapes_tasks):
    """The tiny model (its weights also as a file), three generated tasks (3 disjoint classes
    each), their caches (shared: read-only)."""
    shared = cached_shapes_tasks(3, 3, images_per_class=4, test_images_per_class=2, size=32,
                                 data_seed=4, views=2, noise_rate=0.25, seed=2)
    return shared.model, shared.tokenizer, list(shared.tasks), shared.weights, shared.tasks_file


def config(weights, **kw):
    base = dict(model="fastprompt-tiny", pretrained=weights, learner="softcpt", epochs=2,
                batch_size=8, n_ctx=4)
    base.update(kw)
    return TrainConfig(**base)


def test_generated_tasks(setup):
    _, _, tasks, _, tasks_file = setup
    assert [t.name for t in tasks] == ["shapes a", "shapes b", "shapes c"]
    classes = [set(t.cache.classnames) for t in tasks]
    assert all(len(c) == 3 for c in classes) and len(set.union(*classes)) == 9  # disjoint
    assert all(t.cache.num_train_images == 12 for t in tasks)
    # Reused when asked again with the same arguments.
    assert make_shapes_tasks(os.path.dirname(tasks_file), num_tasks=3, classes_per_task=3,
                             images_per_class=4, test_images_per_class=2, size=32,
                             seed=4) == tasks_file


def test_epoch_order_mixes_tasks_and_is_pure(setup):
    _, _, tasks, weights, _ = setup
    cfg = config(weights)
    task, sample, row = softcpt_module.multitask_epoch_order(cfg, tasks, 3)
    again = softcpt_module.multitask_epoch_order(cfg, tasks, 3)
    assert all(torch.equal(a, b) for a, b in zip((task, sample, row), again))
    assert not torch.equal(task, softcpt_module.multitask_epoch_order(cfg, tasks, 4)[0])
    for t, spec in enumerate(tasks):
        mine = task == t
        assert sorted(sample[mine].tolist()) == list(range(12))          # every image once
        assert torch.equal(spec.cache.train_sample_index[row[mine]], sample[mine])
    assert len(set(task[:8].tolist())) > 1  # the first batch already mixes tasks
    # One task: CoOp's order exactly.
    _, s1, r1 = softcpt_module.multitask_epoch_order(cfg, tasks[:1], 5)
    s2, r2 = epoch_order(cfg, tasks[0].cache, 5)
    assert torch.equal(s1, s2) and torch.equal(r1, r2)


def objectives(cfg, tasks, zeroshot=None):
    """Each task's ``Objective`` (hard targets: the zero-shot features only feed ProGrad)."""
    if zeroshot is None:
        zeroshot = [torch.zeros(t.cache.num_classes, 64) for t in tasks]
    return [Objective(cfg, t.cache, z, torch.device("cpu")) for t, z in zip(tasks, zeroshot)]


def test_task_loss_sees_only_its_own_classes(setup):
    """Each task's images are scored against its own classes only: task A's loss is the
    cross-entropy over A's C_A logits, puts no gradient on task B's class features, and does
    not change when B's labels do."""
    _, _, tasks, weights, _ = setup
    cfg = config(weights)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randn(3, 64, generator=g, requires_grad=True) for _ in range(2)]
    a_rows, b_rows = torch.tensor([0, 5, 13]), torch.tensor([2, 20])
    groups = [(0, a_rows % 12, a_rows), (1, b_rows % 12, b_rows)]
    scale = torch.tensor(10.0)
    options = [{"double_softmax": False}] * 3
    loss, kl, per_task = softcpt_module.multitask_loss(texts, groups, objectives(cfg, tasks),
                                                       options, scale)
    assert kl is None and [t for t, _ in per_task] == [0, 1]
    expected = []
    for (t, _, rows), text in zip(groups, texts):
        x = F.normalize(tasks[t].cache.train_features[rows].float(), dim=-1)
        z = scale * x @ F.normalize(text, dim=-1).T
        expected.append(F.cross_entropy(z, tasks[t].cache.train_labels[rows]))
    torch.testing.assert_close(loss, (3 * expected[0] + 2 * expected[1]) / 5)

    # A batch of task A only: no gradient on task B's class features.
    loss_a, _, _ = softcpt_module.multitask_loss(texts, groups[:1], objectives(cfg, tasks),
                                                 options, scale)
    grads = torch.autograd.grad(loss_a, texts, allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None


def test_prograd_per_task_uses_each_tasks_zeroshot(setup):
    _, _, tasks, weights, _ = setup
    cfg = config(weights, prograd=True, temperature=2.0)
    g = torch.Generator().manual_seed(1)
    texts = [torch.randn(3, 64, generator=g) for _ in range(2)]
    zeroshot = [F.normalize(torch.randn(3, 64, generator=g), dim=-1) for _ in range(3)]
    rows = torch.tensor([1, 2, 3])
    groups = [(0, rows, rows), (2, rows, rows)]
    options = [{"double_softmax": False}] * 3
    _, kl, _ = softcpt_module.multitask_loss([texts[0], texts[1]], groups,
                                             objectives(cfg, tasks, zeroshot), options,
                                             torch.tensor(10.0))
    expected = 0
    for (t, _, r), text in zip(groups, texts):
        x = tasks[t].cache.train_features[r].float()
        _, k = fastprompt.prograd_losses(x, text, zeroshot[t], tasks[t].cache.train_labels[r],
                                         10.0, temperature=2.0)
        expected = expected + k / 2
    torch.testing.assert_close(kl, expected)


COMBOS = [dict(), dict(loss="dspt", targets="isl", alternate=True, prograd=True),
          dict(targets="csl", task_ctx="per_task")]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: config("w", **c).describe() + str(len(c)))
def test_softcpt_trains_and_reports_per_task(setup, tmp_path, combo):
    model, tok, tasks, weights, _ = setup
    cfg = config(weights, **combo)
    metrics = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "run", progress=False)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert np.isfinite(e["loss"]) and e["loss"] > 0 and len(e["task_loss"]) == 3
        assert len(e["task_train_acc_noisy"]) == 3 and ("kl_loss" in e) == cfg.prograd
        # The epoch loss is the image-weighted mean of the per-task losses.
        assert e["loss"] == pytest.approx(sum(e["task_loss"]) / 3, rel=1e-5)
    if combo.get("alternate"):
        assert [e["soft_targets"] for e in metrics["epochs"]] == [False, True]
    assert [t["name"] for t in metrics["tasks"]] == ["shapes a", "shapes b", "shapes c"]
    accs = [t["test_acc"] for t in metrics["tasks"]]
    assert all(0 <= a <= 1 for a in accs)
    assert metrics["test_acc"] == pytest.approx(sum(accs) / 3)
    rows = 3 if cfg.task_ctx == "per_task" else 1
    assert metrics["trainable_parameters"] == rows * 4 * 64 + 64 * 4 * 64
    assert metrics["parameters"]["coop_one_prompt_per_task"] == 3 * 4 * 64
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["tasks"][1]["test_acc"] == metrics["tasks"][1]["test_acc"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["learner"] == "softcpt"
    # The trained tensors moved from their initialisation.
    tensors = trained_tensors(tmp_path / "run")
    torch.manual_seed(cfg.seed)
    initial = softcpt_module.softcpt_model(model, tok, [t.name for t in tasks],
                                           [t.cache.classnames for t in tasks], cfg)
    assert not torch.equal(tensors["meta_weight"], initial.meta_net.weight.detach())


def test_resume_equals_uninterrupted(setup, tmp_path, monkeypatch, interrupt_at_epoch):
    model, tok, tasks, weights, _ = setup
    cfg = config(weights, epochs=3, targets="ls", prograd=True)
    full = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "full", progress=False)
    interrupt_at_epoch(softcpt_module.SoftCPTLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_softcpt_run(cfg, tasks, model, tok, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "prompt.safetensors").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="out: .*already holds a training run"):
        train_softcpt_run(cfg, tasks, model, tok, tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="resume: .*different run .*config"):
        train_softcpt_run(config(weights, epochs=3, lr=0.01), tasks, model, tok, tmp_path / "cut",
                          resume=True, progress=False)
    with pytest.raises(ValueError, match="resume: .*different run .*tasks"):
        train_softcpt_run(cfg, tasks[::-1], model, tok, tmp_path / "cut", resume=True,
                          progress=False)
    resumed = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "cut", resume=True,
                                progress=False)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in full["epochs"]]
    a = trained_tensors(tmp_path / "full")
    b = trained_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [t["test_acc"] for t in resumed["tasks"]] == [t["test_acc"] for t in full["tasks"]]


def test_export_one_task_matches_torch(setup, tmp_path):
    """load_run(task=...) rebuilds that task's classifier from the meta network's context, and
    the exported head-only ONNX model gives torch's probabilities on the task's test features."""
    from fastprompt.serve import OnnxClassifier
    from fastprompt.models import PromptedTextModel
    model, tok, tasks, weights, _ = setup
    cfg = config(weights, epochs=1)
    metrics = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run", task="Shapes_B")
    assert run.class_names == tasks[1].cache.classnames and run.method["task"] == "shapes b"
    # Independently: the meta network's context for task b through CoOp's prompted model.
    tensors = trained_tensors(tmp_path / "run")
    net = softcpt_module.softcpt_model(model, tok, [t.name for t in tasks],
                                       [t.cache.classnames for t in tasks], cfg)
    net.load_trainable_state(tensors)
    with torch.no_grad():
        ctx = net.contexts([1])[0]
        expected = PromptedTextModel(model, tok, tasks[1].cache.classnames, n_ctx=4)(ctx=ctx)
    torch.testing.assert_close(run.text_features, expected.float(), rtol=1e-5, atol=1e-5)
    x = tasks[1].cache.test_features.float()
    acc = (x @ F.normalize(run.text_features, dim=-1).T).argmax(1).eq(tasks[1].cache.test_labels)
    assert acc.float().mean().item() == pytest.approx(metrics["tasks"][1]["test_acc"])

    report = export_run(tmp_path / "run", tmp_path / "onnx", task="shapes b", head_only=True, seed=0)
    assert report.verified and report.num_classes == 3
    clf = OnnxClassifier(tmp_path / "onnx")
    assert clf.class_names == tasks[1].cache.classnames
    probs = clf.predict_proba(x.numpy())
    torch_probs = (run.scale * F.normalize(x, dim=-1) @ F.normalize(expected.float(), dim=-1).T)
    np.testing.assert_allclose(probs, torch_probs.softmax(-1).numpy(), atol=1e-5)


def test_load_run_errors(setup, tmp_path):
    model, tok, tasks, weights, _ = setup
    train_softcpt_run(config(weights, epochs=1), tasks[:2], model, tok, tmp_path / "soft",
                      progress=False)
    with pytest.raises(ValueError, match=r"SoftCPT run over 2 tasks \['shapes a', 'shapes b'\]; "
                                         "pick one with --task"):
        load_run(tmp_path / "soft")
    with pytest.raises(ValueError, match="task: the run has no task 'shapes c'"):
        load_run(tmp_path / "soft", task="shapes c")
    train_run(TrainConfig(model="fastprompt-tiny", pretrained=weights, epochs=1, n_ctx=4),
              tasks[0].cache, model, tok, tmp_path / "coop", progress=False)
    with pytest.raises(ValueError, match="not a SoftCPT run; --task applies"):
        load_run(tmp_path / "coop", task="shapes a")
    with pytest.raises(ValueError, match="learner 'softcpt' does not train on one cache"):
        train_run(config(weights), tasks[0].cache, model, tok, tmp_path / "x", progress=False)


def test_bad_tasks_refused_in_python(setup, tmp_path):
    model, tok, tasks, weights, _ = setup
    with pytest.raises(ValueError, match="tasks: duplicate task name 'Shapes A'"):
        train_softcpt_run(config(weights), [tasks[0], Task("Shapes A", tasks[1].cache)], model,
                          tok, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="config: expected a TrainConfig with learner='softcpt'"):
        train_softcpt_run(config(weights, learner="coop"), tasks, model, tok, tmp_path / "run",
                          progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Command line


def cli_args(setup, out, *extra):
    weights = setup[3]
    return ["train", "--method", "softcpt", "--pretrained", weights, "--views", "2",
            "--epochs", "1", "--n-ctx", "4", "--batch-size", "8", "--out", str(out),
            "--no-progress", *extra]


def test_cli_train_and_export_one_task(setup, tmp_path, capsys):
    tasks_file = setup[4]
    out = tmp_path / "run"
    assert main(cli_args(setup, out, "--tasks", tasks_file, "--task-ctx", "per-task",
                         "--softcpt-loss", "dspt")) == 0
    text = capsys.readouterr().out
    assert "shapes b: test accuracy" in text and "softcpt(dspt) over 3 tasks" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["task_ctx"] == "per_task" and len(metrics["tasks"]) == 3
    assert len(os.listdir(out / "features")) == 3
    assert main(["export", str(out), str(tmp_path / "onnx"), "--task", "shapes c",
                 "--head-only"]) == 0
    assert "passed" in capsys.readouterr().out
    assert main(["export", str(out), str(tmp_path / "onnx2")]) == 2
    assert "pick one with --task" in capsys.readouterr().err
    assert not (tmp_path / "onnx2").exists()


def test_cli_several_data_folders(setup, tmp_path, capsys):
    folders = [spec.data for spec in read_tasks_file(setup[4])[:2]]
    out = tmp_path / "run"
    assert main(cli_args(setup, out, "--data", folders[0], "--data", folders[1],
                         "--task-names", "first shapes", "second shapes")) == 0
    assert "second shapes: test accuracy" in capsys.readouterr().out
    # Several --data without SoftCPT is refused.
    argv = cli_args(setup, tmp_path / "coop", "--data", folders[0], "--data", folders[1])
    argv[argv.index("softcpt")] = "coop"
    assert main(argv) == 2
    assert "several folders train together only with --method softcpt" in capsys.readouterr().err


def write_tasks(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("case", ["missing folder", "duplicate names", "one class", "no method",
                                  "unknown key", "not a list"])
def test_cli_bad_tasks_file_writes_nothing(setup, tmp_path, capsys, case):
    specs = read_tasks_file(setup[4])
    good = [{"name": s.name, "data": s.data} for s in specs[:2]]
    one_class = tmp_path / "one"
    os.makedirs(one_class / "only_class")
    src = os.path.join(specs[0].data, "train", sorted(os.listdir(os.path.join(specs[0].data, "train")))[0])
    for f in sorted(os.listdir(src))[:3]:
        with open(os.path.join(src, f), "rb") as a, open(one_class / "only_class" / f, "wb") as b:
            b.write(a.read())
    entries, extra, match = {
        "missing folder": (good + [{"name": "gone", "data": "no/such/folder"}], [],
                           "task 'gone': data folder .*no/such/folder.* does not exist"),
        "duplicate names": (good + [{"name": "Shapes_A", "data": specs[2].data}], [],
                            "duplicate task name 'Shapes_A'"),
        "one class": (good + [{"name": "single", "data": str(one_class)}], [],
                      "task 'single' .*found only one class"),
        "no method": (good, ["--method", "coop"], "--tasks: .*add --method softcpt"),
        "unknown key": ([{**good[0], "labels": 3}], [], "entry 1 has unknown keys \\['labels'\\]"),
        "not a list": ({"name": "x"}, [], "expected a non-empty JSON list"),
    }[case]
    tasks_file = write_tasks(tmp_path / "tasks.json", entries)
    out = tmp_path / "run"
    argv = cli_args(setup, out, "--tasks", tasks_file, *extra)  # a later --method wins
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastprompt train: error:")
    assert re.search(match, err), err
    assert not out.exists()


def test_cli_resume_into_a_coop_run_is_refused_before_caching(setup, tmp_path, capsys):
    model, tok, tasks, weights, tasks_file = setup
    out = tmp_path / "coop"
    train_run(TrainConfig(model="fastprompt-tiny", pretrained=weights, epochs=1, n_ctx=4),
              tasks[0].cache, model, tok, out, progress=False)
    assert main(cli_args(setup, out, "--tasks", tasks_file, "--resume")) == 2
    assert "is a 'coop' run, not 'softcpt'" in capsys.readouterr().err
    assert not (out / "features").exists()
