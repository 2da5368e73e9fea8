"""The chunked cache build: chunk boundaries, two ranks under torchrun against one process, a
killed build resumed, damaged chunk files, missing chunks named, and the merge's memory bound.
Uses fastprompt-tiny (64x64 images, D = 64)."""
import importlib.util
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.data import (build_feature_cache, encode_cache_chunks, load_cache,
                             load_image_folder, merge_cache_chunks, plan_feature_cache)
from fastprompt.data.cache import encode as encode_module
from fastprompt.data.cache import torchrun_rank
from fastprompt.data.cache.stream import read_header

NAME = "fastprompt-tiny"
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench",
                     "bench_cache_merge.py")
# 20 training images x 2 views in encoder batches of 2 images: 5 chunks of 4 images (8 views),
# and the 8 test images in one chunk.
SMALL = dict(views=2, batch_size=4, chunk_size=8, progress=False)


@pytest.fixture(scope="module")
def shared(cached_shapes):
    """The shared 4-class shapes set (5 training, 2 test images per class) and its cache, built
    by one process with ``SMALL``."""
    return cached_shapes(4, **{k: v for k, v in SMALL.items() if k != "progress"})


@pytest.fixture(scope="module")
def shapes(shared):
    return shared.root


@pytest.fixture(scope="module")
def single(shared):
    return shared.cache


def _assert_same(a, b):
    for key in ("train_features", "test_features", "val_features", "train_labels",
                "train_sample_index", "train_view_index", "test_labels"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.train_paths == b.train_paths and a.test_paths == b.test_paths


def test_chunks_align_with_encoder_batches_and_change_nothing(tmp_path, shapes, tiny_clip,
                                                             single):
    """Chunks of one encoder batch give the features of one pass over everything, bit for bit:
    a chunk boundary is a batch boundary, so each batch holds the same images either way."""
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes)
    plan = plan_feature_cache(tmp_path / "p.st", model, NAME, pre_train, pre_val, splits,
                              views=2, batch_size=5, chunk_size=9)
    # batch_size 5 views = 2 images of 2 views; chunk_size 9 views = 2 whole batches = 4 images
    assert [(c.split, c.start, c.stop) for c in plan.chunks] == [
        ("train", 0, 4), ("train", 4, 8), ("train", 8, 12), ("train", 12, 16),
        ("train", 16, 20), ("test", 0, 5), ("test", 5, 8)]
    whole = build_feature_cache(tmp_path / "whole.st", model, NAME, pre_train, pre_val, splits,
                                **{**SMALL, "chunk_size": 10**6})
    _assert_same(single, whole)
    assert load_cache(single.path).fingerprint == whole.fingerprint   # checksum verified
    assert os.listdir(tmp_path) == ["whole.st"]                       # chunk folder removed
    assert os.listdir(os.path.dirname(single.path)) == [os.path.basename(single.path)]


def test_merged_file_is_a_plain_safetensors_file(single):
    cache = single
    tensors = load_file(cache.path)
    m = cache.num_train_images
    assert tensors["train_features"].shape == (2 * m, 64)
    assert torch.equal(tensors["train_features"], cache.train_features)
    assert torch.equal(tensors["train_view_index"], torch.arange(2).repeat_interleave(m))
    blob = b"\0".join(os.fsencode(p) for p in cache.train_paths)
    assert tensors["train_paths"].numpy().tobytes() == blob
    # Every tensor starts at a multiple of its element size, as save_file lays them out.
    header, start = read_header(cache.path)
    for name, info in header.items():
        if name != "__metadata__":
            assert (start + info["data_offsets"][0]) % tensors[name].element_size() == 0, name


def _cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_two_ranks_under_torchrun_equal_one_process(tmp_path, shapes, single):
    """``fastprompt cache`` under torchrun with 2 ranks (no process group: the ranks meet
    through the chunk files) writes the file one process writes, byte for byte."""
    two = _cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastprompt", "cache", "--data", shapes, "--views", "2",
               "--batch-size-cache", "4", "--cache-chunk", "8", "--device", "cpu",
               "--out", tmp_path / "two.st")
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("cache ") == 1  # rank 0 alone reports
    assert two.stderr.count("4 classes") == 1 and two.stderr.count("RANDOM weights") == 1
    assert "(rank 1 of 2)" in two.stderr   # every rank shows its progress
    with open(single.path, "rb") as f:
        assert (tmp_path / "two.st").read_bytes() == f.read()
    assert os.listdir(tmp_path) == ["two.st"]


_KILLED_BUILD = """
import os, signal, sys
import fastprompt.data.cache.encode as encode
from fastprompt.data import build_feature_cache, load_image_folder
from fastprompt.models import TINY_MODEL, create_model
real, written = encode.write_chunk, []
def write_then_die(plan, chunk, features):
    real(plan, chunk, features)
    written.append(chunk.index)
    if len(written) == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)   # no clean-up of any kind
encode.write_chunk = write_then_die
model, pre_train, pre_val, _ = create_model(TINY_MODEL)
build_feature_cache(sys.argv[2], model, "fastprompt-tiny", pre_train, pre_val,
                    load_image_folder(sys.argv[1]), **{kwargs})
"""


def test_killed_build_resumes_with_the_missing_and_damaged_chunks(tmp_path, shapes, tiny_clip,
                                                                  single, monkeypatch):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes)
    path = tmp_path / "c.st"
    script = _KILLED_BUILD.format(kill_after=4, kwargs=repr(SMALL))
    killed = _cli("-c", script, shapes, path, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    plan = plan_feature_cache(path, model, NAME, pre_train, pre_val, splits,
                              **{k: v for k, v in SMALL.items() if k != "progress"})
    present = sorted(i for i in range(len(plan.chunks)) if os.path.exists(plan.chunk_path(i)))
    assert len(present) == 4 and not path.exists()
    damaged, truncated = present[1], present[2]
    with open(plan.chunk_path(damaged), "r+b") as f:   # one bit of its features
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    with open(plan.chunk_path(truncated), "r+b") as f:
        f.truncate(os.path.getsize(plan.chunk_path(truncated)) - 2)

    encoded = []
    real = encode_module.write_chunk
    monkeypatch.setattr(encode_module, "write_chunk",
                        lambda plan, chunk, f: (encoded.append(chunk.index), real(plan, chunk, f)))
    resumed = build_feature_cache(path, model, NAME, pre_train, pre_val, splits, **SMALL)
    missing = set(range(len(plan.chunks))) - set(present)
    assert sorted(encoded) == sorted(missing | {damaged, truncated})
    _assert_same(resumed, single)
    assert not os.path.exists(plan.chunk_dir)


def test_missing_chunks_are_named_and_any_process_can_encode_them(tmp_path, shapes, tiny_clip,
                                                                  single):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes)
    plan = plan_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits,
                              views=2, batch_size=4, chunk_size=8)
    assert len(plan.chunks) == 6
    assert encode_cache_chunks(plan, range(0, 6, 2), model, progress=False) == [0, 2, 4]
    assert encode_cache_chunks(plan, [0], model, progress=False) == []   # valid: skipped
    with pytest.raises(TimeoutError, match=r"3 of 6 chunk files missing .*chunks 1, 3, 5"):
        merge_cache_chunks(plan, timeout=0.2)
    assert encode_cache_chunks(plan, range(1, 6, 2), model, progress=False) == [1, 3, 5]
    _assert_same(merge_cache_chunks(plan), single)
    # A chunk file of a build from other arguments is foreign: encoded again.
    other = plan_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits,
                               views=2, batch_size=4, chunk_size=8, seed=2)
    assert encode_cache_chunks(plan, [0], model, progress=False) == [0]
    assert encode_cache_chunks(other, [0], model, progress=False) == [0]
    assert encode_cache_chunks(other, [0], model, progress=False) == []
    with pytest.raises(ValueError, match="^chunks: 6 is not a chunk index"):
        encode_cache_chunks(plan, [6], model)


def test_chunk_files_of_another_chunk_size_go_with_the_merge(tmp_path, shapes, tiny_clip,
                                                            single):
    """A build interrupted with one --cache-chunk and rerun with another: once the cache is
    merged, the old layout's chunk files (and killed writers' temporaries) go with the current
    ones, and so does the chunk folder (issue 23, item 20)."""
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes)
    path = tmp_path / "c.st"
    old = plan_feature_cache(path, model, NAME, pre_train, pre_val, splits, views=2,
                             batch_size=4, chunk_size=4)
    assert len(old.chunks) == 12
    encode_cache_chunks(old, range(1, 12), model, progress=False)   # chunk 0 "killed"
    stale = os.path.join(old.chunk_dir, ".000011.safetensors.x1y2.tmp")
    open(stale, "wb").close()
    (tmp_path / "c.st.chunks" / "notes.txt").write_text("not a chunk file: kept")
    merged = build_feature_cache(path, model, NAME, pre_train, pre_val, splits, **SMALL)
    _assert_same(merged, single)
    assert sorted(os.listdir(old.chunk_dir)) == ["notes.txt"]
    os.remove(old.chunk_dir + "/notes.txt")
    encode_cache_chunks(old, [11], model, progress=False)
    build_feature_cache(path, model, NAME, pre_train, pre_val, splits,
                        **{**SMALL, "chunk_size": 12})
    assert sorted(os.listdir(tmp_path)) == ["c.st"]


def test_bad_chunk_size_plan_and_launch_environment(tmp_path, shapes, tiny_clip, monkeypatch):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes)
    with pytest.raises(ValueError, match="^chunk_size: expected an int >= 1"):
        plan_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits,
                           chunk_size=0)
    with pytest.raises(TypeError, match="^plan: expected a CachePlan"):
        encode_cache_chunks("plan", [0], model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"^RANK: 2 is not in \[0, WORLD_SIZE=2\)"):
        build_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits, **SMALL)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="^RANK: environment variable is 'one'"):
        torchrun_rank()
    assert os.listdir(tmp_path) == []


def test_merge_memory_is_bounded(tmp_path):
    """The merge of a 1 GiB cache (131072 images x 8 views x 512 float16) raises the peak
    resident memory of its process by less than 200 MiB: it streams the chunk files.
    (``bench/bench_cache_merge.py`` writes the chunk files, merges in a fresh process, checks
    rows of the result and removes everything.)"""
    spec = importlib.util.spec_from_file_location("bench_cache_merge", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(str(tmp_path), 1.0, "streaming", timeout=300)
    assert result["file_bytes"] > 2**30
    rise = result["peak_rss_rise_bytes"]
    assert rise < 200 * 2**20, f"peak RSS rose by {rise / 2**20:.0f} MiB"
    assert os.listdir(tmp_path) == []
