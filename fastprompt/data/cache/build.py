"""Building a cache: :func:`build_feature_cache` and :func:`build_or_load_cache`, the cache's lock
(:func:`cache_lock`), and how the processes of a ``torchrun`` launch share a build through the
chunk files (each encodes its share; rank 0 waits for the others' files and merges; the others
wait for its cache file). :func:`merge_cache_chunks` is the merge with its lock and its wait,
for builds spread by other means."""
from __future__ import annotations

import logging
import os
import time

import torch

from fastprompt._io import exclusive_lock
from fastprompt.data.cache.chunks import chunk_problem, file_key
from fastprompt.data.cache.encode import encode_chunks
from fastprompt.data.cache.load import FeatureCache, load_cache
from fastprompt.data.cache.merge import write_merged_cache
from fastprompt.data.cache.plan import CachePlan, plan_feature_cache, torchrun_rank
from fastprompt.data.cache.spec import CacheSpec, as_spec, check_path, check_run_options

# How long a process waits for the others' chunk files (or rank 0's merge) without any arriving.
CHUNK_WAIT_SECONDS = 1800.0
POLL_SECONDS = 0.5
logger = logging.getLogger("fastprompt.data")


def cache_lock(path):
    """The exclusive lock of building the cache file ``path``."""
    path = os.path.abspath(os.fspath(path))
    lock = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
    return exclusive_lock(lock, f"feature cache {path!r}", remove=True)


def wait_for_chunks(plan: CachePlan, verified: dict, timeout: float) -> None:
    """Return once every chunk has a valid file; each file is checked once (again when it is
    replaced). ``verified``: chunk index -> file key of the files already found valid.
    ``TimeoutError`` naming the missing chunks when ``timeout`` seconds pass without a new
    valid one."""
    rejected: dict = {}
    last_progress = time.monotonic()
    while True:
        missing = []
        for c in plan.chunks:
            key = file_key(plan.chunk_path(c.index))
            if key is not None and verified.get(c.index) == key:
                continue
            if key is None or rejected.get(c.index) == key or chunk_problem(plan, c):
                rejected[c.index] = key
                missing.append(c.index)
            else:
                verified[c.index] = key
                last_progress = time.monotonic()
        if not missing:
            return
        if time.monotonic() - last_progress >= timeout:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise TimeoutError(
                f"feature cache {plan.path!r}: {len(missing)} of {len(plan.chunks)} chunk files "
                f"missing or invalid in {plan.chunk_dir!r} after {timeout:g} s without a new "
                f"one (chunks {shown}); did a process stop? Run the build again, with any "
                "number of processes: the valid chunk files are kept")
        time.sleep(POLL_SECONDS)


def wait_for_merged(plan: CachePlan, timeout: float) -> FeatureCache:
    """Wait for the process merging the chunks to write the cache file (the chunk folder goes
    once it has); ``TimeoutError`` after ``timeout`` seconds without a change in that folder."""
    last_change, seen = time.monotonic(), None
    while True:
        if not os.path.isdir(plan.chunk_dir) and os.path.isfile(plan.path):
            try:
                return load_cache(plan.path, plan.fingerprint, verify=False)
            except ValueError:
                pass  # an older file not yet replaced
        try:
            now_seen = sorted(os.listdir(plan.chunk_dir))
        except OSError:
            now_seen = None
        if now_seen != seen:
            seen, last_change = now_seen, time.monotonic()
        elif time.monotonic() - last_change >= timeout:
            raise TimeoutError(f"feature cache {plan.path!r}: not written by the merging process "
                               f"(rank 0) within {timeout:g} s of the last change in "
                               f"{plan.chunk_dir!r}")
        time.sleep(POLL_SECONDS)


def merge_cache_chunks(plan: CachePlan, *, timeout: float = 0.0) -> FeatureCache:
    """Write the cache file of ``plan`` from its chunk files (every one must be valid; waits up
    to ``timeout`` seconds for missing ones, counted from the last one that arrived), holding
    the cache's lock; the chunk files are removed afterwards. Memory stays bounded by a few
    pieces of a few MB, whatever the size of the cache. Returns the loaded cache."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan: expected a CachePlan, got {type(plan).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout: expected seconds >= 0, got {timeout!r}")
    with cache_lock(plan.path):
        wait_for_chunks(plan, {}, float(timeout))
        return write_merged_cache(plan)


def build_planned(plan: CachePlan, model, *, num_workers: int, progress: bool | None,
                  reason: Exception | None = None) -> FeatureCache:
    """Encode this process's share of the chunks (rank r of W: r, r + W, ...); rank 0 then
    merges under the cache's lock, the other ranks wait for its file. ``reason``: why an
    existing file is rebuilt (logged)."""
    rank, world = torchrun_rank()
    mine = [c.index for c in plan.chunks][rank::world]
    if rank != 0:
        encode_chunks(plan, mine, model, num_workers=num_workers, progress=progress,
                      verified={})
        return wait_for_merged(plan, CHUNK_WAIT_SECONDS)
    with cache_lock(plan.path):
        if reason is not None:
            logger.warning("fastprompt: rebuilding the feature cache: %s", reason)
        verified: dict = {}
        encode_chunks(plan, mine, model, num_workers=num_workers, progress=progress,
                      verified=verified)
        wait_for_chunks(plan, verified, CHUNK_WAIT_SECONDS)
        return write_merged_cache(plan)


def build_feature_cache(path, spec: CacheSpec | torch.nn.Module | None = None, *args,
                        num_workers: int = 0, progress: bool | None = None,
                        **spec_args) -> FeatureCache:
    """Encode a data set with the frozen image tower and write the cache file at ``path``.

    ``spec`` (a :class:`~fastprompt.data.cache.CacheSpec`) says what is cached; as in 0.1,
    its arguments may stand in its place: ``build_feature_cache(path, model, model_name,
    preprocess_train, preprocess_val, splits, views=..., shots=..., noise_rate=...,
    noise_type=..., noise_per_class=..., seed=..., add_flip=..., batch_size=..., chunk_size=...,
    num_workers=..., progress=...)``.

    The training split is first reduced to ``shots`` images per class (all when None) and its
    labels corrupted at ``noise_rate``, or ``noise_per_class`` per class (see
    :func:`~fastprompt.data.few_shot_subset`, :func:`~fastprompt.data.add_label_noise` and
    :func:`~fastprompt.data.add_label_noise_per_class`; all seeded from ``seed``). Each training image
    then gets ``views`` views from ``preprocess_train`` — plus a random horizontal flip when
    ``add_flip`` and the transform has none — and each test/val image one from
    ``preprocess_val``. The model runs where its parameters are, in their dtype, under
    ``torch.inference_mode``, ``batch_size`` views at a time (rounded down to whole images);
    ``num_workers`` > 0 decodes in DataLoader workers (the result does not depend on it).
    ``progress``: a tqdm bar; None shows it when stderr is a terminal and prints progress
    lines otherwise; False shows nothing. A lock file beside ``path`` (``.NAME.lock``) keeps two
    processes from building the same cache at once (the second gets ``LockedError``).

    The work is split into chunks of ``chunk_size`` views (see
    :func:`~fastprompt.data.cache.plan_feature_cache`), each written to its own file in
    ``<path>.chunks/``; a build that was killed resumes from the chunk files it left. Under
    ``torchrun`` (``RANK``/``WORLD_SIZE`` set), rank r of W encodes chunks r, r + W, ...; rank 0
    (alone holding the lock) waits for the others' files and merges; every rank returns the
    cache. The merge streams the chunk files into the cache file and removes them. Returns the
    loaded cache.
    Note that open_clip's training transform crops with scale (0.9, 1.0); CoOp crops with
    (0.08, 1.0): pass your own ``preprocess_train`` to match it.
    """
    check_path(path)
    check_run_options(num_workers, progress)
    spec = as_spec(spec, args, spec_args)
    plan = plan_feature_cache(path, spec)
    return build_planned(plan, spec.model, num_workers=num_workers, progress=progress)


def build_or_load_cache(path, spec: CacheSpec | torch.nn.Module | None = None, *args,
                        num_workers: int = 0, progress: bool | None = None, verify: bool = True,
                        **spec_args) -> FeatureCache:
    """Load the cache at ``path`` if it was built from ``spec`` exactly, else (re)build it.

    Arguments as :func:`build_feature_cache` (the 0.1 argument list too; under ``torchrun``
    too); ``verify``: check the content checksum of an existing file. A stale, truncated or
    damaged cache is rebuilt, and a warning on the ``fastprompt.data`` logger says why.
    """
    check_path(path)
    check_run_options(num_workers, progress)
    spec = as_spec(spec, args, spec_args)
    plan = plan_feature_cache(path, spec)
    if os.path.isfile(os.fspath(path)):  # a valid cache needs no lock (it may be read-only)
        try:
            return load_cache(path, plan.fingerprint, verify=verify)
        except ValueError as e:
            reason = e
    else:
        reason = None
    return build_planned(plan, spec.model, num_workers=num_workers, progress=progress,
                         reason=reason)
