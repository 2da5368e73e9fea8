"""Sweeps: the grid's runs are ordinary run folders, the report's numbers come from them, a
rerun skips finished runs and resumes an interrupted one, features are encoded once and label
noise derived without re-encoding, and --jobs K gives the same runs."""
import csv
import json
import os
import re
import statistics

import pytest
import torch

from fastprompt.cli import main
from fastprompt.data import build_or_load_cache, load_cache, make_shapes_dataset
from fastprompt.data.cache import noisy_variant
from fastprompt.protocols.sweep import run_sweep
from fastprompt.protocols.sweep_grid import load_spec, parse_method


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("sweep")
    make_shapes_dataset(root / "shapes", num_classes=4, images_per_class=3,
                        test_images_per_class=2, seed=5)
    os.link(tiny_weights, root / "tiny.safetensors")
    return root


def _spec(world, name, **fields):
    spec = {"data": "shapes", "pretrained": "tiny.safetensors", "views": 1,
            "train": {"epochs": 2, "n_ctx": 2}, **fields}
    path = world / name
    path.write_text(json.dumps(spec))
    return str(path)


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_method_names():
    assert parse_method("coop").overrides == {"learner": "coop", "loss": "ce"}
    assert parse_method("dspt+isl(alt)+prograd").overrides == {
        "learner": "coop", "loss": "dspt", "targets": "isl", "alternate": True, "prograd": True}
    m = parse_method({"name": "coop lr 0.01", "method": "coop+ls", "lr": 0.01})
    assert m.label == "coop lr 0.01" and m.overrides["targets"] == "ls" and m.overrides["lr"] == 0.01
    with pytest.raises(ValueError, match="plug-in"):
        parse_method("coop+mixup")
    assert parse_method("gce+nlprompt").overrides == {"learner": "coop", "loss": "gce",
                                                      "nlprompt": True}
    assert parse_method("kgcoop(dspt)+dept").overrides == {"learner": "kgcoop", "loss": "dspt",
                                                           "dept": True}
    assert parse_method("cocoop").overrides == {"learner": "cocoop", "loss": "ce"}
    assert parse_method("joapr").overrides == {"learner": "coop", "loss": "ce", "joapr": True}
    assert parse_method("nlprompt+ls").overrides == {"learner": "coop", "loss": "ce",
                                                     "nlprompt": True, "targets": "ls",
                                                     "alternate": False}
    with pytest.raises(ValueError, match="must start with"):
        parse_method("coop(dspt)")
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        parse_method("kgcoop(focal)")


def test_bad_specs_are_refused_by_name(world):
    with pytest.raises(ValueError, match="'methods'"):
        load_spec(_spec(world, "a.json"))
    with pytest.raises(ValueError, match="noise_rates"):
        load_spec(_spec(world, "b.json", methods=["coop"], noise_rates=[1.5]))
    with pytest.raises(ValueError, match="targets"):
        load_spec(_spec(world, "c.json", methods=["coop"], protocol="cross-dataset"))
    with pytest.raises(ValueError, match="seed"):
        load_spec(_spec(world, "d.json", methods=["coop"], train={"seed": 3}))
    with pytest.raises(ValueError, match=r"methods\[1\].*nlprompt.*not mae"):
        load_spec(_spec(world, "e.json", methods=["coop", "mae+nlprompt"]))


def test_label_noise_methods_get_a_row_each_and_a_purity_table(world, tmp_path):
    """PTNL's GCE, MAE, NLPrompt (on DSPT) and JoAPR against CoOp, clean and at 50% noise: a
    row per method in each table, and the kept samples' correct-label share for the two methods
    that split their data."""
    spec = load_spec(_spec(world, "noise.json",
                           methods=["coop", "gce", "mae", "dspt+nlprompt", "joapr"],
                           noise_rates=[0.0, 0.5], seeds=[1],
                           train={"epochs": 2, "n_ctx": 2, "ot_reg": 0.01}))
    out = tmp_path / "sweep"
    run_sweep(spec, out, log=lambda *_: None)
    run = out / "runs" / "dspt+nlprompt" / "shots-all" / "noise-symmetric-0.5" / "seed-1"
    metrics = _metrics(run)
    assert metrics["config"]["nlprompt"] and metrics["config"]["loss"] == "dspt"
    kept = metrics["epochs"][-1]["nlprompt_kept_precision"]
    report = (out / "report.md").read_text()
    sections = report.split("## ")
    accuracy = next(s for s in sections if s.startswith("Accuracy (%) against symmetric"))
    assert [line.split("|")[1].strip() for line in accuracy.splitlines()
            if line.startswith("| ") and "---" not in line][1:] == [
        "zero-shot", "coop", "gce", "mae", "dspt+nlprompt", "joapr"]
    purity = next(s for s in sections if s.startswith("Correct labels among the samples kept"))
    rows = [line for line in purity.splitlines() if line.startswith("| dspt")]
    assert len(rows) == 1 and f"{100 * kept:.1f}" in rows[0].split("|")[3]
    joapr = _metrics(out / "runs" / "joapr" / "shots-all" / "noise-symmetric-0.5" / "seed-1")
    assert joapr["config"]["joapr"] and "joapr_kept_precision" in joapr["epochs"][-1]
    assert [line.split("|")[1].strip() for line in purity.splitlines()
            if line.startswith("| ") and "---" not in line][1:] == ["dspt+nlprompt", "joapr"]
    assert "| coop |" not in purity


def test_sweep_report_rerun_and_resume(world, tmp_path, capsys, monkeypatch):
    """A 2 methods x 2 seeds sweep; the last run is interrupted after its first epoch, the
    rerun resumes it and skips the others; one report cell is recomputed from the run folders."""
    from fastprompt.train import CoOpLearner
    spec_path = _spec(world, "sweep.json", methods=["coop", "dspt"], seeds=[1, 2])
    out = tmp_path / "sweep"
    train_epoch = CoOpLearner.train_epoch

    def interrupted(self, epoch, bar):
        if self.config.seed == 2 and self.config.loss == "dspt" and epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch=epoch, bar=bar)

    monkeypatch.setattr(CoOpLearner, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_spec(spec_path), out, log=lambda *_: None)
    monkeypatch.setattr(CoOpLearner, "train_epoch", train_epoch)
    runs = out / "runs"
    last = runs / "dspt" / "shots-all" / "noise-none-0" / "seed-2"
    assert not (last / "metrics.json").exists()
    saved = torch.load(last / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    finished = sorted(runs.rglob("metrics.json"))
    assert len(finished) == 3
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    assert main(["sweep", spec_path, "--out", str(out), "--no-progress"]) == 0
    assert "0 trained, 1 resumed, 3 already finished, 0 failed" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    resumed = _metrics(last)
    assert len(resumed["epochs"]) == 2 and resumed["epochs"][0] == saved["history"][0]
    assert (last / "curves.png").stat().st_size > 0

    # One cell recomputed from its run folders: coop over seeds 1 and 2.
    accs = [100 * _metrics(runs / "coop" / "shots-all" / "noise-none-0" / f"seed-{s}")["test_acc"]
            for s in (1, 2)]
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cell = next(r for r in rows if r["method"] == "coop")
    assert cell["column"] == "all" and int(cell["n"]) == 2
    assert float(cell["mean"]) == pytest.approx(statistics.mean(accs))
    assert float(cell["std"]) == pytest.approx(statistics.stdev(accs))
    zero_shot = [100 * _metrics(runs / "coop" / "shots-all" / "noise-none-0" / f"seed-{s}")
                 ["zeroshot_test_acc"] for s in (1, 2)]
    assert float(rows[0]["mean"]) == pytest.approx(statistics.mean(zero_shot))
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | all |" and table[1].startswith("| zero-shot |")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["coop", "dspt"]
    assert f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}" in table[2]

    assert main(["sweep", spec_path, "--out", str(out), "--no-progress"]) == 0
    assert "0 trained, 0 resumed, 4 already finished" in capsys.readouterr().out


def test_noise_variant_equals_a_built_cache(world, tiny_clip, tmp_path):
    """A label-noise variant derived from the clean cache is the cache a build with that noise
    gives (same fingerprint, features and labels), and is reused as such."""
    from fastprompt.data import load_dataset
    model, pt, pv, _ = tiny_clip
    splits = load_dataset(world / "shapes")
    args = dict(views=2, shots=2, seed=3)
    clean = build_or_load_cache(tmp_path / "clean.safetensors", model, "fastprompt-tiny", pt, pv,
                                splits, progress=False, **args)
    derived = noisy_variant(clean, tmp_path / "noisy.safetensors", model, "fastprompt-tiny", pt,
                            pv, splits, noise_rate=0.5, noise_type="pairflip")
    stamp = os.stat(derived.path).st_mtime_ns
    reused = build_or_load_cache(derived.path, model, "fastprompt-tiny", pt, pv, splits,
                                 noise_rate=0.5, noise_type="pairflip", progress=False, **args)
    assert os.stat(derived.path).st_mtime_ns == stamp  # loaded, not rebuilt
    built = build_or_load_cache(tmp_path / "built.safetensors", model, "fastprompt-tiny", pt, pv,
                                splits, noise_rate=0.5, noise_type="pairflip", progress=False,
                                **args)
    assert reused.fingerprint == built.fingerprint
    assert torch.equal(reused.train_labels, built.train_labels)
    assert not torch.equal(built.train_labels, built.train_clean_labels)
    assert torch.equal(reused.train_features, built.train_features)
    load_cache(derived.path)  # checksum intact


def test_a_per_class_noise_sweep(world, tmp_path):
    """noise_protocol per-class: noise rate 0.5 of 2 shots is 1 wrong label in every class (and
    every label on 1 image of another class), derived from the clean cache; the table stays
    indexed by rate, the report says the protocol, and a rate sweep is refused in its folder."""
    import collections
    spec_path = _spec(world, "per-class.json", methods=["coop"], seeds=[1], shots=[2],
                      noise_rates=[0.0, 0.5], noise_protocol="per-class",
                      train={"epochs": 1, "n_ctx": 2})
    out = tmp_path / "sweep"
    result = run_sweep(load_spec(spec_path), out, log=lambda *_: None)
    assert len(result.trained) == 2 and not result.failed
    run = out / "runs" / "coop" / "shots-2" / "noise-symmetric-k1" / "seed-1"
    fingerprint = _metrics(run)["cache"]["fingerprint"]
    assert fingerprint["noise_per_class"] == 1 and fingerprint["noise_rate"] == 0.0
    cache = load_cache(out / "features" / "shapes-all-shots2-seed1-views1-symmetric-k1.safetensors",
                       fingerprint)
    wrong = [(y, z) for y, z in zip(cache.train_clean_labels.tolist(), cache.train_labels.tolist())
             if y != z]
    assert collections.Counter(y for y, _ in wrong) == {c: 1 for c in range(4)}
    assert collections.Counter(z for _, z in wrong) == {c: 1 for c in range(4)}
    report = (out / "report.md").read_text()
    assert "Label noise (per-class protocol, as PTNL and JoAPR)" in report
    assert "| method | 0 | 0.5 |" in report
    assert json.loads((out / "sweep.json").read_text())["noise_protocol"] == "per-class"

    rate = _spec(world, "rate.json", methods=["coop"], seeds=[1], shots=[2],
                 noise_rates=[0.0, 0.5], train={"epochs": 1, "n_ctx": 2})
    with pytest.raises(ValueError, match="fields that differ: noise_protocol"):
        run_sweep(load_spec(rate), out, log=lambda *_: None)


def test_jobs_run_the_same_runs(world, tmp_path, capsys):
    spec_path = _spec(world, "jobs.json", methods=["coop"], seeds=[1, 2],
                      train={"epochs": 1, "n_ctx": 2})
    assert main(["sweep", spec_path, "--out", str(tmp_path / "two"), "--jobs", "2",
                 "--no-progress"]) == 0
    assert "2 trained" in capsys.readouterr().out
    assert main(["sweep", spec_path, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    for seed in (1, 2):
        run = os.path.join("runs", "coop", "shots-all", "noise-none-0", f"seed-{seed}")
        a, b = _metrics(tmp_path / "two" / run), _metrics(tmp_path / "one" / run)
        assert a["test_acc"] == b["test_acc"] and a["epochs"][0]["loss"] == b["epochs"][0]["loss"]


def _csv(out):
    with open(out / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_base_to_new_and_cross_dataset_sweeps(world, tmp_path, capsys):
    from fastprompt.protocols.stats import harmonic_mean
    make_shapes_dataset(tmp_path / "target", num_classes=3, images_per_class=1,
                        test_images_per_class=2, seed=8)
    b2n = _spec(world, "b2n.json", methods=["coop"], seeds=[1, 2], protocol="base-to-new",
                train={"epochs": 1, "n_ctx": 2})
    assert main(["sweep", b2n, "--out", str(tmp_path / "b2n"), "--no-progress"]) == 0
    rows = {(r["method"], r["column"]): r for r in _csv(tmp_path / "b2n")}
    evaluations = [json.loads((tmp_path / "b2n" / "runs" / "coop" / "shots-all" /
                               "noise-none-0" / f"seed-{s}" / "evaluation.json").read_text())
                   ["base_to_new"] for s in (1, 2)]
    base = statistics.mean(100 * e["base_acc"] for e in evaluations)
    new = statistics.mean(100 * e["new_acc"] for e in evaluations)
    assert float(rows["coop", "Base"]["mean"]) == pytest.approx(base)
    assert float(rows["coop", "New"]["mean"]) == pytest.approx(new)
    assert float(rows["coop", "H"]["mean"]) == pytest.approx(harmonic_mean(base, new))
    assert [e["base"]["num_classes"] for e in evaluations] == [2, 2]  # 4 classes: 2 base, 2 new

    cross = _spec(world, "cross.json", methods=["coop"], seeds=[1], protocol="cross-dataset",
                  targets=[{"name": "other", "data": str(tmp_path / "target")},
                           {"name": "all of it", "data": "shapes", "all_images": True}],
                  train={"epochs": 1, "n_ctx": 2})
    assert main(["sweep", cross, "--out", str(tmp_path / "cross"), "--no-progress"]) == 0
    capsys.readouterr()
    rows = {(r["method"], r["column"]): float(r["mean"]) for r in _csv(tmp_path / "cross")}
    run = tmp_path / "cross" / "runs" / "coop" / "shots-all" / "noise-none-0" / "seed-1"
    targets = json.loads((run / "evaluation.json").read_text())["targets"]
    assert targets["other"]["num_classes"] == 3 and targets["all of it"]["num_test_images"] == 20
    assert rows["coop", "shapes (source)"] == pytest.approx(100 * _metrics(run)["test_acc"])
    assert rows["coop", "other"] == pytest.approx(100 * targets["other"]["test_acc"])
    assert rows["coop", "average"] == pytest.approx(
        50 * (targets["other"]["test_acc"] + targets["all of it"]["test_acc"]))
    assert rows["zero-shot", "other"] == pytest.approx(
        100 * targets["other"]["zeroshot_test_acc"])
    assert (tmp_path / "cross" / "report.md").read_text().count(".png)") == 1


def test_a_refused_sweep_leaves_the_folder_as_it_was(world, tmp_path):
    """A different spec is refused in a folder holding runs of another (the differing fields
    named), and a sweep refused by any check writes no sweep.json (issue 23, item 1)."""
    first = _spec(world, "keep.json", methods=["coop"], seeds=[1],
                  train={"epochs": 1, "n_ctx": 2})
    out = tmp_path / "sweep"
    run_sweep(load_spec(first), out, log=lambda *_: None)
    record, report = (out / "sweep.json").read_bytes(), (out / "report.md").read_bytes()
    other = _spec(world, "other.json", methods=["coop", "dspt"], seeds=[1, 2],
                  train={"epochs": 1, "n_ctx": 2})
    with pytest.raises(ValueError, match=r"another spec.*fields that differ: methods, seeds"):
        run_sweep(load_spec(other), out, log=lambda *_: None)
    assert (out / "sweep.json").read_bytes() == record
    assert main(["plot", str(out)]) == 0
    assert (out / "report.md").read_bytes() == report   # the finished run is still reported

    # A check that reads the folder (a run of other settings where the spec's run goes) comes
    # before the spec is written too.
    foreign = tmp_path / "foreign"
    run = foreign / "runs" / "coop" / "shots-all" / "noise-none-0" / "seed-1"
    run.mkdir(parents=True)
    metrics = _metrics(out / "runs" / "coop" / "shots-all" / "noise-none-0" / "seed-1")
    metrics["config"]["lr"] = 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="finished run of other settings"):
        run_sweep(load_spec(first), foreign, log=lambda *_: None)
    assert sorted(p.name for p in foreign.iterdir()) == [".lock", "runs"]


def test_a_sweep_folder_without_results_takes_a_new_spec(world, tmp_path):
    """A spec whose sweep trained nothing (here: its only run failed) may be replaced: nothing
    of it is lost."""
    out = tmp_path / "sweep"
    (out / "runs" / "coop" / "shots-all" / "noise-none-0").mkdir(parents=True)
    # A file where the run folder goes: the run fails, the sweep finishes with it failed.
    (out / "runs" / "coop" / "shots-all" / "noise-none-0" / "seed-1").write_text("")
    failing = _spec(world, "fails.json", methods=["coop"], seeds=[1],
                    train={"epochs": 1, "n_ctx": 2})
    result = run_sweep(load_spec(failing), out, log=lambda *_: None)
    assert len(result.failed) == 1 and (out / "sweep.json").exists()
    (out / "runs" / "coop" / "shots-all" / "noise-none-0" / "seed-1").unlink()
    fixed = _spec(world, "fixed.json", methods=["coop"], seeds=[2],
                  train={"epochs": 1, "n_ctx": 2})
    result = run_sweep(load_spec(fixed), out, log=lambda *_: None)
    assert len(result.trained) == 1
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [2]


def test_a_sweep_folder_in_use_is_refused_naming_the_holder(world, tmp_path):
    """One sweep at a time in a folder (issue 23, item 14)."""
    from fastprompt._io import LockedError
    from fastprompt.protocols.sweep import sweep_lock
    out = tmp_path / "sweep"
    spec = load_spec(_spec(world, "locked.json", methods=["coop"], seeds=[1],
                           train={"epochs": 1, "n_ctx": 2}))
    with sweep_lock(str(out)):
        with pytest.raises(LockedError, match=f"sweep folder {out} is in use .*pid {os.getpid()}"):
            run_sweep(spec, out, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_plot_refuses_damaged_numbers_naming_the_file(world, tmp_path):
    """`plot` checks what it reads from metrics.json and evaluation.json (issue 23, item 17)."""
    from fastprompt.protocols.report import redraw
    from fastprompt.protocols.sweep_grid import SPEC_COPY, jobs_of
    run = tmp_path / "run"
    run.mkdir()
    for metrics, where in [({"epochs": [1, 2]}, "epochs[0]"),
                           ({"epochs": [{"epoch": 0, "loss": "low"}]}, "epochs[0].loss"),
                           ({"epochs": [{"epoch": "0", "loss": 1.0}]}, "epochs[0].epoch"),
                           ({"epochs": [{"epoch": 0, "loss": 1.0}], "test_acc": "x"}, "test_acc"),
                           ({"epochs": {"0": 1}}, "epochs")]:
        (run / "metrics.json").write_text(json.dumps(metrics))
        with pytest.raises(ValueError, match=f"{run / 'metrics.json'}: {re.escape(where)}: "):
            redraw([run])
    spec = load_spec(_spec(world, "plotted.json", methods=["coop"], seeds=[1]))
    out = tmp_path / "sweep"
    out.mkdir()
    (out / SPEC_COPY).write_text(json.dumps(spec.to_dict()))
    job = jobs_of(spec, str(out))[0]
    os.makedirs(job.run_dir)
    good = {"epochs": [{"epoch": 0, "loss": 1.0}], "test_acc": 0.5, "zeroshot_test_acc": 0.25}
    for metrics, evaluation, name, where in [
            ({**good, "test_acc": [0.5]}, None, "metrics.json", "test_acc"),
            ({**good, "zeroshot_test_acc": "x"}, None, "metrics.json", "zeroshot_test_acc"),
            (good, {"base_to_new": {"base_acc": 0.5}}, "evaluation.json", "base_to_new.new_acc"),
            (good, {"targets": {"t": 3}}, "evaluation.json", "targets.t")]:
        with open(os.path.join(job.run_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        if evaluation is not None:
            with open(os.path.join(job.run_dir, "evaluation.json"), "w") as f:
                json.dump(evaluation, f)
        path = os.path.join(job.run_dir, name)
        with pytest.raises(ValueError, match=f"{re.escape(path)}: {re.escape(where)}"):
            redraw([out])
