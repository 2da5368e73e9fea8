"""Class sharding under torchrun (CPU, gloo, 2 ranks): a sharded step equals the one-process step
for every learner and target kind, with and without the chunked text backward; two ranks train
the one-process prompt; a run started on two ranks resumes on one; refusals reach every rank.

Each torchrun launch runs in a subprocess with a timeout; ranks report through files."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastprompt._io import exclusive_lock
from fastprompt.cli import main
from fastprompt.data import load_cache, make_shapes_dataset
from fastprompt.train import read_prompt
from fastprompt.train.class_sharding import shard_bounds

sys.path.insert(0, os.path.dirname(__file__))
import sharding_worker  # noqa: E402

WORKER = sharding_worker.__file__
TIMEOUT_S = 300


def torchrun(*args, nproc=2, cwd=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC ARGS`` with this interpreter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


@pytest.mark.parametrize("classes, ranks, sizes", [(7, 2, [4, 3]), (8, 4, [2, 2, 2, 2]),
                                                   (2, 3, [1, 1, 0]), (10, 3, [4, 3, 3])])
def test_shard_bounds_are_contiguous_and_even(classes, ranks, sizes):
    bounds = shard_bounds(classes, ranks)
    assert [b - a for a, b in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == classes
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(ranks - 1))


@pytest.fixture(scope="module")
def cache_file(cached_shapes):
    """A shapes cache of the tiny model for the ranks' refusals (shared: read-only; the ranks
    only load it)."""
    return cached_shapes(3, images_per_class=4, test_images_per_class=2, size=32, data_seed=2,
                         views=2, seed=1).cache.path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, session_seed, cache_file):
    """Every step case and refusal on 2 ranks: ``[rank 0's record, rank 1's]``."""
    out = tmp_path_factory.mktemp("sharded-steps")
    os.makedirs(out / "locked")
    with exclusive_lock(str(out / "locked" / ".lock"), "test"):
        done = torchrun(WORKER, "steps", out, session_seed, cache_file)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", [*sharding_worker.CASES, *sharding_worker.LEARNER_CASES])
def test_sharded_step_equals_one_process(sharded, tiny_text, session_seed, cache_file, case):
    model, tokenizer = tiny_text
    if case in sharding_worker.LEARNER_CASES:
        expected = sharding_worker.run_learner_case(case, session_seed, model, tokenizer,
                                                    load_cache(cache_file), chunk=0)
    else:
        expected = sharding_worker.run_case(case, session_seed, model, tokenizer, chunk=0)
    rank0, rank1 = (r["results"][case] for r in sharded)
    torch.testing.assert_close(rank0["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    for got, want in zip(rank0["grads"], expected["grads"]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    # Every rank applies the same update: identical loss and summed gradients.
    assert torch.equal(rank1["loss"], rank0["loss"])
    assert all(torch.equal(a, b) for a, b in zip(rank0["grads"], rank1["grads"]))


def test_compile_is_refused_with_several_ranks(sharded):
    for record in sharded:
        kind, message = record["errors"]["compile"]
        assert kind == "ValueError" and "--compile" in message and "2 ranks" in message


def test_ranks_with_other_model_weights_fail_on_every_rank(sharded):
    for record in sharded:
        kind, message = record["errors"]["weights"]
        assert kind == "ValueError"
        assert "rank 1 in model_state" in message and "disagree with rank 0" in message


def test_a_locked_run_folder_fails_every_rank(sharded):
    (kind0, message0), (kind1, message1) = (r["errors"]["locked"] for r in sharded)
    assert kind0 == "LockedError" and "in use" in message0
    assert kind1 == "OtherRankError" and "rank 0 failed: LockedError" in message1


# ---------------------------------------------------------------------------------------------
# fastprompt train under torchrun


def train_args(data, cache, out, *extra):
    return ["train", "--data", str(data), "--cache", str(cache), "--out", str(out),
            "--epochs", "4", "--n-ctx", "2", "--batch-size", "8", "--method", "dspt",
            "--targets", "isl", "--class-specific", "--no-progress", *extra]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-train")
    data = root / "shapes"
    make_shapes_dataset(data, num_classes=5, images_per_class=4, test_images_per_class=1, seed=4)
    assert main(train_args(data, root / "cache.safetensors", root / "one")) == 0
    return root


def test_two_ranks_train_the_one_process_prompt(one_process_run):
    root = one_process_run
    # Its own cache file: rank 0 builds it while rank 1 waits, then rank 1 loads it.
    done = torchrun("-m", "fastprompt", *train_args(root / "shapes", root / "cache2.safetensors",
                                                    root / "two", "--text-chunk", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fastprompt: 2 ranks (gloo), 5 classes: 3 + 2 per rank" in done.stderr
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone reports
    torch.testing.assert_close(read_prompt(root / "two")[0], read_prompt(root / "one")[0],
                               rtol=1e-4, atol=1e-6)
    one, two = (json.loads((root / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert [e["loss"] for e in two["epochs"]] == pytest.approx([e["loss"] for e in one["epochs"]],
                                                               rel=1e-5)


def test_a_two_rank_run_resumes_on_one_process(one_process_run):
    root = one_process_run
    args = train_args(root / "shapes", root / "cache.safetensors", root / "cut")
    done = torchrun(WORKER, "interrupt", 2, *args)
    assert done.returncode != 0 and "interrupted" in done.stderr
    checkpoint = torch.load(root / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert main([*args, "--resume"]) == 0
    torch.testing.assert_close(read_prompt(root / "cut")[0], read_prompt(root / "one")[0],
                               rtol=1e-4, atol=1e-6)


def test_a_killed_rank_is_named_and_resume_advised(one_process_run):
    """A rank killed mid-training: the survivor does not print gloo's raw RuntimeError as an
    unexpected error (exit 1) but says that another rank stopped, which, and that --resume
    continues, with exit 2 (issue 23, item 10). The survivor ignores torchrun's SIGTERM (see
    sharding_worker.die) so that it is not stopped before it has said so."""
    root = one_process_run
    args = train_args(root / "shapes", root / "cache.safetensors", root / "killed")
    done = torchrun(WORKER, "die", 1, 2, *args)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("fastprompt train")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("fastprompt train: error: torchrun: rank 1 "), lines[0]
    assert "stopped" in lines[0] and "--resume" in lines[0]
    assert "unexpected error" not in done.stderr and "pair.cc" not in done.stderr
    assert "exitcode  : 2 " in done.stderr  # torchrun's report of rank 0
    assert torch.load(root / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("bad", ["0", "-5", "nan"])
def test_bad_dist_timeout_is_refused(tmp_path, capsys, bad):
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                 "--dist-timeout", bad]) == 2
    assert "--dist-timeout: expected seconds > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_gpu_named_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    # torchrun's environment for rank 1 of 2: each rank takes cuda:LOCAL_RANK itself.
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                 "--device", "cuda:0"]) == 2
    assert "--device: 'cuda:0' names one GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
