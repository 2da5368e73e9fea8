"""Sweeps: a grid of ordinary training runs over methods and plug-ins, shots, label-noise rates
and types, and seeds, under one protocol (few-shot, base-to-new or cross-dataset), then the
paper-style report (``fastprompt.protocols.report``). The spec and the grid it expands to are
``fastprompt.protocols.sweep_grid``.

Layout of the sweep folder ``OUT``::

    .lock                     held while a sweep runs in the folder: one sweep at a time
    sweep.json                the spec as read (paths absolute): what the report is made from;
                              written once every check has passed, and a folder holding runs
                              takes no other spec
    features/                 one cache per (data half, shots, seed, views), encoded once; one
                              label-noise variant of it per noise rate and type (no re-encoding):
                              ...-<type><rate>, or ...-<type>-k<N> under the per-class protocol
                              (N noisy labels per class)
    features/eval/            test-only caches of the evaluated data (base/new halves, targets)
    runs/<method>/shots-<K>/noise-<type>-<rate>/seed-<S>/
                              (per-class protocol: noise-<type>-k<N>) an ordinary run folder
                              (``fastprompt eval``, ``export`` and ``plot`` take it), plus
                              ``evaluation.json`` (base-to-new or target accuracies) and
                              ``curves.png``
    report.md, report.csv     the tables; plots as PNG beside them

Rerunning a sweep skips finished runs (``metrics.json`` of the same config, and its evaluation),
resumes interrupted ones from their last epoch's checkpoint and trains the rest.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from fastprompt._io import dumps_json, exclusive_lock, read_json, write_json_atomic
from fastprompt.data import build_or_load_cache, load_cache
from fastprompt.data.cache import noisy_variant
from fastprompt.models import create_model
from fastprompt.models.factory import check_device
from fastprompt.protocols.evaluation import base_to_new, evaluate_on_data
from fastprompt.protocols.plots import CURVES, plot_curves
from fastprompt.protocols.report import write_report
from fastprompt.protocols.sweep_grid import (EVALUATION, SPEC_COPY, Job, SweepSpec, cache_path,
                                             jobs_of)
from fastprompt.train import Task, TrainConfig, train_run, train_softcpt_run
from fastprompt.train.files import CHECKPOINT, METRICS, read_metrics

SWEEP_LOCK = ".lock"
# How often a worker process looks whether the sweep that started it is still there.
PARENT_POLL_SECONDS = 0.5

# ---------------------------------------------------------------------------------------------
# The sweep folder


def sweep_lock(out: str):
    """The lock of the sweep folder ``out`` (``OUT/.lock``), held while a sweep runs there: a
    second sweep into it is refused naming the holder's pid. It dies with its process."""
    return exclusive_lock(os.path.join(out, SWEEP_LOCK), f"sweep folder {out}")


def _holds_runs(out: str) -> bool:
    """Whether ``out/runs`` holds a finished or interrupted run (what a report is made of)."""
    for _, _, files in os.walk(os.path.join(out, "runs")):
        if METRICS in files or CHECKPOINT in files:
            return True
    return False


def check_folder_spec(spec: SweepSpec, out: str) -> None:
    """Refuse ``spec`` in a sweep folder whose sweep.json records another spec and which holds
    runs: its report is made from its sweep.json, so that spec is kept (the fields that differ
    named). The ``device`` may differ; a folder without runs takes any spec (nothing is lost)."""
    path = os.path.join(out, SPEC_COPY)
    if not os.path.isfile(path):
        return
    recorded = read_json(path, "sweep")
    if not isinstance(recorded, dict):
        raise ValueError(f"sweep: {path} is not a sweep spec (expected a JSON object)")
    wanted = json.loads(dumps_json(spec.to_dict()))
    differ = sorted(k for k in set(wanted) | set(recorded)
                    if k != "device" and wanted.get(k) != recorded.get(k))
    if differ and _holds_runs(out):
        raise ValueError(f"sweep: {out} holds runs of another spec ({path}; fields that differ: "
                         f"{', '.join(differ)}); sweep into another --out, or remove {SPEC_COPY} "
                         "there to make this spec its record")


# ---------------------------------------------------------------------------------------------
# Running


def run_state(job: Job) -> str:
    """``"finished"`` (metrics of the same config), ``"interrupted"`` (a checkpoint, no
    metrics), ``"new"``; a folder holding a run of other settings raises ValueError."""
    if os.path.isfile(os.path.join(job.run_dir, METRICS)):
        recorded = read_metrics(job.run_dir).get("config")
        if recorded != TrainConfig.from_dict(job.config).to_dict():
            raise ValueError(f"sweep: {job.run_dir} holds a finished run of other settings than "
                             "the spec asks for; remove it, or sweep into another --out")
        return "finished"
    return "interrupted" if os.path.isfile(os.path.join(job.run_dir, CHECKPOINT)) else "new"


_MODELS: dict = {}


def _model(name: str, pretrained: str | None, device: str, image_tower: bool = True):
    """The frozen model of a process, created once per (name, weights, device); without its
    image tower when only cached features are needed and no full one is at hand."""
    key = (name, pretrained, device)
    for tower in (True,) if image_tower else (True, False):
        if (*key, tower) in _MODELS:
            return _MODELS[(*key, tower)]
    _MODELS[(*key, image_tower)] = create_model(name, pretrained, device, image_tower=image_tower)
    return _MODELS[(*key, image_tower)]


def watch_parent(parent: int) -> None:
    """Run in each worker process as it starts: a daemon thread that ends the worker once the
    sweep process ``parent`` is gone (killed with SIGKILL, its workers would otherwise wait for
    work forever). A dead parent's children are adopted by another process, so the parent pid
    seen from here changes. The worker's run keeps its last finished epoch's checkpoint."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        with contextlib.suppress(OSError):  # stderr may have gone with the parent
            print(f"fastprompt sweep: worker {os.getpid()}: the sweep (pid {parent}) is gone; "
                  "stopping (rerun the sweep to resume)", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="fastprompt-watch-parent", daemon=True).start()


def train_job(job: Job, device: str, threads: int | None = None) -> dict:
    """Train one run of the grid (resuming its checkpoint when there is one) on its cache;
    returns its metrics. Runs in a worker process with ``--jobs`` > 1."""

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig.from_dict(job.config)
    model, _, _, tokenizer = _model(config.model, config.pretrained, device, image_tower=False)
    cache = load_cache(job.cache)
    resume = run_state(job) == "interrupted"
    if config.learner == "softcpt":
        return train_softcpt_run(config, [Task(job.task, cache)], model, tokenizer, job.run_dir,
                                 resume=resume, progress=False, device=device)
    return train_run(config, cache, model, tokenizer, job.run_dir, resume=resume,
                     progress=False, device=device, data=job.data)


def evaluate_job(job: Job, spec: SweepSpec, out: str, device: str) -> dict:
    """The protocol's evaluation of a finished run, written to ``RUN/evaluation.json``."""
    cache_dir = os.path.join(out, "features", "eval")
    if spec.protocol == "base-to-new":
        result = {"base_to_new": base_to_new(job.run_dir, cache_dir=cache_dir, device=device,
                                             progress=False)}
    elif spec.protocol == "cross-dataset":
        result = {"targets": {t.name: evaluate_on_data(
            job.run_dir, dataclasses.replace(t.source, seed=job.seed), all_images=t.all_images,
            cache_dir=cache_dir, task=job.task, device=device, progress=False)
            for t in spec.targets}}
    else:
        return {}
    write_json_atomic(os.path.join(job.run_dir, EVALUATION), result)
    return result


def _evaluated(job: Job, spec: SweepSpec) -> bool:
    return spec.protocol == "few-shot" or os.path.isfile(os.path.join(job.run_dir, EVALUATION))


def build_caches(spec: SweepSpec, out: str, device: str, progress: bool | None, log) -> None:
    """Encode every (shots, seed) once; derive its label-noise variants from it."""
    model, pt, pv, _ = _model(spec.model, spec.pretrained, device)
    for shots in spec.shots:
        for seed in spec.seeds:
            source = dataclasses.replace(spec.data, seed=seed)
            splits = source.load(shots=shots)
            path = cache_path(out, spec, shots, seed)
            t = time.perf_counter()
            clean = build_or_load_cache(path, model, spec.model, pt, pv, splits, views=spec.views,
                                        shots=shots, seed=seed, progress=progress)
            log(f"features: {os.path.relpath(path, out)} ({clean.num_train_images} images x "
                f"{clean.views} views, {time.perf_counter() - t:.1f} s)")
            for noise_type, rate in spec.noise_settings():
                if rate > 0:
                    per_class = spec.noise_per_class(shots, rate)
                    noise = ({"noise_rate": rate} if per_class is None
                             else {"noise_per_class": per_class})
                    noisy_variant(clean, cache_path(out, spec, shots, seed, noise_type, rate),
                                  model, spec.model, pt, pv, splits, noise_type=noise_type,
                                  **noise)


@dataclass
class SweepResult:
    trained: list = field(default_factory=list)
    resumed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)   # (job, message)


def run_sweep(spec: SweepSpec, out, *, jobs: int = 1, progress: bool | None = None,
              log=print) -> SweepResult:
    """Run every job of ``spec`` into ``out`` (``jobs`` at once, in worker processes when more
    than one), evaluate each by the protocol, and write the report. A failing run is reported
    and the others go on."""

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs: expected an int >= 1, got {jobs!r}")
    device = check_device(spec.device, "device")
    out = os.path.abspath(os.fspath(out))
    created = not os.path.lexists(out)
    os.makedirs(out, exist_ok=True)
    with sweep_lock(out):
        try:
            grid, states = _prepare(spec, out, device, progress, log)
        except BaseException:
            if created:  # refused before the spec was written: leave no empty folder behind
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, SWEEP_LOCK))
                    os.rmdir(out)
            raise
        # Every check has passed and the data has loaded: the folder's record of its spec.
        write_json_atomic(os.path.join(out, SPEC_COPY), spec.to_dict())
        return _run_grid(spec, out, grid, states, device, jobs, log)


def _prepare(spec: SweepSpec, out: str, device: str, progress: bool | None,
             log) -> tuple[list[Job], dict]:
    """The grid and each run's state once the folder is checked (its spec; no run of other
    settings where the spec's runs go), with the caches the runs to train need."""
    check_folder_spec(spec, out)
    grid = jobs_of(spec, out)
    states = {job.key: run_state(job) for job in grid}
    todo = [j for j in grid if states[j.key] != "finished"]
    log(f"sweep: {len(grid)} runs ({spec.protocol}): {len(grid) - len(todo)} finished, "
        f"{sum(states[j.key] == 'interrupted' for j in todo)} to resume, "
        f"{sum(states[j.key] == 'new' for j in todo)} to train")
    if todo:
        build_caches(spec, out, device, progress, log)
    return grid, states


def _run_grid(spec: SweepSpec, out: str, grid: list[Job], states: dict, device: str, jobs: int,
              log) -> SweepResult:
    """Train (or resume) the runs not finished, evaluate them, and write the report."""
    result = SweepResult()
    todo = [j for j in grid if states[j.key] != "finished"]
    result.skipped = [j for j in grid if states[j.key] == "finished"]
    for job in result.skipped:
        if not os.path.isfile(os.path.join(job.run_dir, CURVES)):
            plot_curves(job.run_dir)

    def finished(job: Job, metrics: dict, seconds: float) -> None:
        (result.resumed if states[job.key] == "interrupted" else result.trained).append(job)
        plot_curves(job.run_dir)
        log(f"  {job.describe()}: test accuracy {metrics['test_acc']:.4f} ({seconds:.1f} s, "
            f"{'resumed' if states[job.key] == 'interrupted' else 'trained'})")

    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            start = time.perf_counter()
            try:
                metrics = train_job(job, device)
            except (ValueError, OSError, RuntimeError) as e:
                result.failed.append((job, f"{type(e).__name__}: {e}"))
                log(f"  {job.describe()}: FAILED: {e}")
                continue
            finished(job, metrics, time.perf_counter() - start)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                    initializer=watch_parent,
                                                    initargs=(os.getpid(),)) as pool:
            starts = {}
            futures = {}
            for job in todo:
                starts[job.key] = time.perf_counter()
                futures[pool.submit(train_job, job, device, threads)] = job
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                try:
                    metrics = future.result()
                except Exception as e:  # the worker's exception, re-raised here
                    result.failed.append((job, f"{type(e).__name__}: {e}"))
                    log(f"  {job.describe()}: FAILED: {e}")
                    continue
                finished(job, metrics, time.perf_counter() - starts[job.key])
    failed = {j.key for j, _ in result.failed}
    for job in grid:
        if job.key not in failed and not _evaluated(job, spec):
            try:
                evaluate_job(job, spec, out, device)
            except (ValueError, OSError, RuntimeError) as e:
                result.failed.append((job, f"evaluation: {type(e).__name__}: {e}"))
                log(f"  {job.describe()}: evaluation FAILED: {e}")
    write_report(out, log=log)
    return result
