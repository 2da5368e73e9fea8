"""Smoke tests of the benchmark scripts that have no test of their own: each runs on tiny sizes,
writes its results files (into a temporary folder) and reports finite numbers."""
import importlib.util
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """``bench(name)``: the script's module, its results written under ``tmp_path``."""
    monkeypatch.syspath_prepend(BENCH)
    import common
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    yield load
    sys.modules.pop("common", None)


def _written(tmp_path, name):
    data = json.loads((tmp_path / f"{name}-cpu.json").read_text())
    assert (tmp_path / f"{name}-cpu.md").read_text().count("|") > 10
    return data


def test_bench_learners(bench, tmp_path):
    rows = bench("bench_learners").main(["--models", "fastprompt-tiny", "--learners", "coop",
                                         "cocoop", "--classes", "3", "--shots", "2",
                                         "--repeats", "1", "--chunk", "4"])
    assert [r["learner"] for r in rows] == ["coop", "cocoop"]
    assert all(math.isfinite(r["speedup"]) and r["speedup"] > 0 for r in rows)
    memory = rows[1]["memory"]
    assert memory["saved_bytes_chunked"] < memory["saved_bytes_plain"]
    assert _written(tmp_path, "learners")["environment"]["command"].endswith("--chunk 4")


def test_bench_ot_pseudo_labels(bench, tmp_path):
    rows = bench("bench_ot_pseudo_labels").main(["--classes", "5", "--shots", "4", "--regs",
                                                 "0.05", "--min-run-time", "0.01", "--pot",
                                                 "--device", "cpu"])
    (row,) = rows
    assert row["n"] == 20 and row["fastprompt_ms"] > 0 and row["agreement_with_pot"] >= 0.95
    assert _written(tmp_path, "ot_pseudo_labels")["results"][0]["c"] == 5


def test_bench_export_cocoop(bench, tmp_path):
    rows = bench("bench_export_cocoop").main(["--models", "fastprompt-tiny", "--classes", "3",
                                              "--batch-sizes", "2", "--repeats", "1",
                                              "--min-run-time", "0.01"])
    (row,) = rows
    assert row["coop_ms_per_image"] > 0 and row["cocoop_ms_per_image"] > 0
    assert row["onnx_bytes"]["cocoop"] > row["onnx_bytes"]["coop"]  # the text tower inside
    assert _written(tmp_path, "export_cocoop")["results"][0]["classes"] == 3


def test_bench_online(bench, tmp_path):
    rows = bench("bench_online").main(["--models", "fastprompt-tiny", "--classes", "3",
                                       "--batch", "2", "--repeats", "1"])
    assert [r["learner"] for r in rows] == ["maple", "ivlp"]
    for r in rows:
        assert r["image_grad_checkpointing"] == "supported"
        assert all(math.isfinite(r[f"{side}_images_per_s"]) and r[f"{side}_images_per_s"] > 0
                   for side in ("official", "fastprompt", "fastprompt_ckpt"))
        # the truncated text tower and the fused loss keep less; checkpointing keeps less again
        assert r["saved_bytes_fastprompt_ckpt"] < r["saved_bytes_fastprompt"]
        assert r["saved_bytes_fastprompt"] < r["saved_bytes_official"]
    assert _written(tmp_path, "online")["environment"]["command"].endswith("--repeats 1")
