"""Smoke test of bench/bench_training.py: both pipelines (the CoOp-style baseline and fastprompt's
cache + train_run) run a couple of epochs on the tiny model and report finite numbers."""
import importlib.util
import math
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_training.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["coop", "dspt"])
def test_both_pipelines_run(tmp_path, method):
    bench = _load()
    rows = bench.main(["--models", "fastprompt-tiny", "--epochs", "2", "--classes", "3",
                       "--shots", "2", "--test", "2", "--views", "2", "--method", method,
                       "--device", "cpu", "--workdir", str(tmp_path), "--no-write"])
    (row,) = rows
    assert row["same_initial_context"]
    assert row["text_features_max_abs_diff"] < 1e-4  # 77 tokens vs truncated: same features
    assert row["prompt_length_baseline"] == 77 > row["prompt_length_fastprompt"]
    for key in ("baseline_test_acc", "fastprompt_test_acc"):
        assert 0.0 <= row[key] <= 1.0
    for key in ("baseline_losses", "fastprompt_losses", "baseline_epoch_seconds",
                "fastprompt_epoch_seconds"):
        assert len(row[key]) == 2 and all(math.isfinite(v) for v in row[key])
    for key in ("cache_build_s", "speedup_epoch", "projected_baseline_total_s",
                "projected_fastprompt_total_s"):
        assert math.isfinite(row[key]) and row[key] > 0
