"""Run folders under faults (issue 14, items 5-8, 10, 12): locks naming the holder, stale
temporary files removed, damaged prompt and checkpoint files refused by name, the umask
honoured, strict JSON, and a run that turns non-finite stopped with its last good checkpoint."""
import fcntl
import json
import math
import os
import stat

import pytest
import torch

from fastprompt._io import LockedError, atomic_write, exclusive_lock, write_json_atomic
from fastprompt.data import build_or_load_cache, make_shapes_dataset
from fastprompt.data.cache import cache_lock
from fastprompt.train import NonFiniteTrainingError, TrainConfig, load_run, train_run
from fastprompt.train import CoOpLearner
from fastprompt.train.files import LOCK, read_checkpoint, run_lock


@pytest.fixture(scope="module")
def world(cached_shapes):
    """The tiny model, a 3-class shapes set (32-pixel images, no validation split) and its
    cache (shared: read-only)."""
    shared = cached_shapes(3, images_per_class=4, test_images_per_class=2, size=32, data_seed=2,
                           views=2, seed=1)
    return shared.model, shared.tokenizer, shared.cache


def config(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "n_ctx": 4, **kw})


def test_run_folder_lock_names_the_holder(world, tmp_path):
    model, tok, cache = world
    run = tmp_path / "run"
    with run_lock(str(run)):
        with pytest.raises(LockedError, match=rf"run folder .*run.* in use .*pid {os.getpid()}"):
            train_run(config(), cache, model, tok, run, progress=False)
    assert sorted(os.listdir(run)) == [LOCK]   # nothing written by the refused run
    train_run(config(), cache, model, tok, run, progress=False)  # the lock died with its holder


def test_cache_lock_names_the_holder(world, tmp_path, tiny_clip):
    model, pt, pv, _ = tiny_clip
    splits = make_shapes_dataset(tmp_path / "shapes", num_classes=2, images_per_class=2, seed=1,
                                 size=32)
    path = tmp_path / "c.safetensors"
    with cache_lock(path):
        with pytest.raises(LockedError, match=rf"feature cache .*c.safetensors.* in use .*pid {os.getpid()}"):
            build_or_load_cache(path, model, "fastprompt-tiny", pt, pv, splits, views=1,
                                progress=False)
    assert not path.exists()


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / ".checkpoint.pt.wr1t1ng.tmp"
    live.write_bytes(b"y")
    other = tmp_path / ".metrics.json.abc.tmp"   # another target's: not ours to judge
    other.write_bytes(b"z")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as a writer in another process would hold it
    try:
        atomic_write(str(target), lambda f: f.write(b"new"))
    finally:
        os.close(fd)
    assert target.read_bytes() == b"new"
    assert not stale.exists() and live.exists() and other.exists()


def _flip_byte_inside(path, needle: bytes):
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_prompt_and_checkpoint_are_refused_by_name(world, tmp_path):
    model, tok, cache = world
    run = tmp_path / "run"
    train_run(config(), cache, model, tok, run, progress=False)
    ctx = load_run(run).text_features  # loads while intact
    assert ctx is not None
    state = read_checkpoint(str(run / "checkpoint.pt"), "coop")
    raw = state["params"]["ctx"].numpy().tobytes()
    _flip_byte_inside(run / "checkpoint.pt", raw)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt.* is damaged \(checksum"):
        train_run(config(), cache, model, tok, run, resume=True, progress=False)
    from safetensors import safe_open
    with safe_open(str(run / "prompt.safetensors"), "pt") as f:
        raw = f.get_tensor("ctx").numpy().tobytes()
    _flip_byte_inside(run / "prompt.safetensors", raw)
    with pytest.raises(ValueError, match=r"run: .*prompt.safetensors.* is damaged \(checksum"):
        load_run(run)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writer_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(str(tmp_path / "m.json"), {"a": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~umask


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_strict(world, tmp_path):
    """No split gives no validation accuracy: null, not NaN, in every JSON file of the run."""
    model, tok, cache = world
    assert cache.val_features.shape[0] == 0
    metrics = train_run(config(), cache, model, tok, tmp_path / "run", progress=False)
    assert math.isnan(metrics["val_acc"])
    files = [p for p in (tmp_path / "run").iterdir() if p.suffix == ".json"]
    assert {p.name for p in files} == {"config.json", "metrics.json"}
    for p in files:
        strict_json(p.read_text())
    assert strict_json((tmp_path / "run" / "metrics.json").read_text())["val_acc"] is None
    write_json_atomic(str(tmp_path / "x.json"), {"a": [float("inf"), -float("inf"), 1.5]})
    assert strict_json((tmp_path / "x.json").read_text()) == {"a": [None, None, 1.5]}


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "smoothing", "lam",
                                  "temperature", "csl_temperature", "warmup_lr"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyper_parameters_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}: must be a finite number"):
        TrainConfig(**{name: value})


def test_non_finite_prompt_stops_the_run_keeping_the_last_good_checkpoint(world, tmp_path,
                                                                        monkeypatch):
    model, tok, cache = world
    real_epoch = CoOpLearner.train_epoch

    def poisoned(self, *, epoch, bar):
        result = real_epoch(self, epoch=epoch, bar=bar)
        if epoch == 1:
            with torch.no_grad():
                self.ctx[0, 0] = float("nan")
        return result

    monkeypatch.setattr(CoOpLearner, "train_epoch", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match=r"ctx became NaN or infinite in epoch 2 .*"
                                                     r"checkpoint.pt keeps epoch 1"):
        train_run(config(epochs=3), cache, model, tok, run, progress=False)
    state = read_checkpoint(str(run / "checkpoint.pt"), "coop")
    assert state["epoch"] == 1 and torch.isfinite(state["params"]["ctx"]).all()
    assert not (run / "prompt.safetensors").exists() and not (run / "metrics.json").exists()
    monkeypatch.undo()
    resumed = train_run(config(epochs=3), cache, model, tok, run, resume=True, progress=False)
    assert len(resumed["epochs"]) == 3


def test_lock_file_is_reused_not_piled_up(tmp_path):
    for _ in range(3):
        with exclusive_lock(str(tmp_path / ".lock"), "x"):
            pass
    assert os.listdir(tmp_path) == [".lock"]
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
