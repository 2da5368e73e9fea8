"""Peak memory of writing a feature cache file from its chunk files: fastprompt's streaming merge
against holding the features in memory and calling ``save_file`` (what a build did before the
chunked build: ``K x M x D`` features in RAM, then safetensors' copy of them).

Synthetic chunk files of a cache of ``--gib`` GiB of training features (8 views, D = 512,
float16, 1024 test images) are written once; each way is then measured in a fresh process, as
the rise of its resident high-water mark (reset through ``/proc/self/clear_refs``) over its
resident size before the merge. Linux only.

    python bench/bench_cache_merge.py [--gib 1] [--workdir DIR] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import environment, markdown_table, write_results  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from fastprompt._hashing import tensor_checksum  # noqa: E402
from fastprompt.data import cache as cache_module  # noqa: E402
from fastprompt.data.cache.chunks import chunk_metadata  # noqa: E402
from fastprompt.data.cache.plan import chunk_layout  # noqa: E402

VIEWS, DIM, TEST_IMAGES, CLASSES, CHUNK_VIEWS = 8, 512, 1024, 10, 65536
WAYS = ("streaming", "in-memory")


def synthetic_plan(path: str, images: int) -> cache_module.CachePlan:
    """The plan of a cache of ``images`` training images (made-up paths and labels)."""
    fingerprint = {"format": cache_module.CACHE_FORMAT, "views": VIEWS, "seed": 1,
                   "num_classes": CLASSES, "num_train_images": images,
                   "num_test_images": TEST_IMAGES, "num_val_images": 0}
    sizes = {"train": images, "test": TEST_IMAGES, "val": 0}
    return cache_module.CachePlan(
        path=os.path.abspath(path), fingerprint=fingerprint,
        classnames=[f"class {i}" for i in range(CLASSES)],
        train=[(f"/images/{i:07d}.jpg", i % CLASSES) for i in range(images)],
        noisy_labels=[(i * 7) % CLASSES for i in range(images)],
        test=[(f"/test/{i:05d}.jpg", i % CLASSES) for i in range(TEST_IMAGES)], val=[],
        preprocess_train=None, preprocess_val=None, add_flip=False, batch_size=256,
        chunks=chunk_layout(sizes, VIEWS, 256, CHUNK_VIEWS))


def pattern(plan: cache_module.CachePlan) -> torch.Tensor:
    """Every training chunk's features: view v of its i-th image is (7 v + i) mod 2048 in every
    column (exact in float16), so one checksum serves all chunks and rows can be checked."""
    per_chunk = plan.chunks[0].stop
    values = (7 * torch.arange(VIEWS)[:, None] + torch.arange(per_chunk)) % 2048
    return values.half()[..., None].expand(-1, -1, DIM).contiguous()


def write_chunks(plan: cache_module.CachePlan) -> None:
    """The chunk files of ``plan`` (cheaply: the training chunks share their content)."""
    os.makedirs(plan.chunk_dir, exist_ok=True)
    for chunk in plan.chunks:
        k = plan.split_views(chunk.split)
        if chunk.split == "train":
            features = pattern(plan)[:, :chunk.stop - chunk.start]
        else:
            features = torch.ones(k, chunk.stop - chunk.start, DIM, dtype=torch.float16)
        tensors = {"features": features.contiguous()}
        metadata = {**chunk_metadata(plan, chunk),
                    "fastprompt.checksum": tensor_checksum(tensors)}
        save_file(tensors, plan.chunk_path(chunk.index), metadata=metadata)


def _in_memory(plan: cache_module.CachePlan) -> None:
    """The former way: every feature in one tensor, its checksum, then ``save_file`` (of the
    features and the labels: the rest of the file is small)."""
    m = len(plan.train)
    train = torch.empty(VIEWS, m, DIM, dtype=torch.float16)
    test = []
    for chunk in plan.chunks:
        features = load_file(plan.chunk_path(chunk.index))["features"]
        if chunk.split == "train":
            train[:, chunk.start:chunk.stop] = features
        else:
            test.append(features[0])
    labels = torch.tensor([y for _, y in plan.train])
    tensors = {"train_features": train.reshape(VIEWS * m, DIM), "test_features": torch.cat(test),
               "train_labels": labels.repeat(VIEWS)}
    save_file(tensors, plan.path,
              metadata={"fastprompt.checksum": tensor_checksum(tensors)})


def _peak_rise(fn) -> int:
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark from here on
    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


def _measure_here(path: str, images: int, way: str) -> dict:
    plan = synthetic_plan(path, images)
    start = time.perf_counter()
    if way == "streaming":
        rise = _peak_rise(lambda: cache_module.merge_cache_chunks(plan))
        cache = cache_module.load_cache(plan.path, plan.fingerprint, verify=False)
        rows = torch.tensor([0, 1, images - 1, images, 5 * images + 77, VIEWS * images - 1])
        expect = pattern(plan)[rows // images, rows % images % plan.chunks[0].stop, 0]
        if not (torch.equal(cache.train_features[rows].amin(1), expect)
                and torch.equal(cache.train_features[rows].amax(1), expect)
                and cache.train_paths[5] == "/images/0000005.jpg"):
            raise AssertionError("the merged cache does not hold the chunks' rows")
    else:
        rise = _peak_rise(lambda: _in_memory(plan))
    return {"way": way, "file_bytes": os.path.getsize(plan.path),
            "features_bytes": VIEWS * images * DIM * 2, "peak_rss_rise_bytes": rise,
            "seconds": time.perf_counter() - start}


def measure(workdir: str, gib: float, way: str, timeout: float = 600) -> dict:
    """Write the chunk files of a ``gib`` GiB cache in ``workdir``, merge them ``way`` in a fresh
    process, and return its numbers; everything written is removed."""
    images = int(gib * 2**30) // (VIEWS * DIM * 2)
    path = os.path.join(workdir, "cache.safetensors")
    try:
        write_chunks(synthetic_plan(path, images))
        code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                f"import bench_cache_merge as b; "
                f"print(json.dumps(b._measure_here({path!r}, {images}, {way!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  os.environ.get("PYTHONPATH", "")])})
        if out.returncode != 0:
            raise RuntimeError(f"merge ({way}) failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(path + ".chunks", ignore_errors=True)
        if os.path.exists(path):
            os.remove(path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="training features, GiB")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temp folder)")
    p.add_argument("--no-write", action="store_true", help="print only, no bench/results files")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fastprompt-merge-")
    rows = [measure(workdir, args.gib, way) for way in WAYS]
    table = markdown_table(
        ["way", "cache file GiB", "peak RSS rise MiB", "seconds"],
        [[r["way"], f"{r['file_bytes'] / 2**30:.2f}", f"{r['peak_rss_rise_bytes'] / 2**20:.0f}",
          f"{r['seconds']:.1f}"] for r in rows])
    print(table)
    if not args.no_write:
        print(write_results("cache_merge", environment(torch.device("cpu")), rows, table))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
