"""Plots (matplotlib, PNG): each run folder's training curves, and a sweep's accuracy against
shots, against label-noise rate, and base/new/H (or cross-dataset) bars per method."""
from __future__ import annotations

import math
import os
import re

from fastprompt._checks import slug
from fastprompt._io import atomic_path
from fastprompt.protocols.records import run_metrics
from fastprompt.protocols.stats import mean_std
from fastprompt.train.files import METRICS

CURVES = "curves.png"


def _pyplot():
    # Imported when a plot is drawn: pyplot takes about half a second to load, and the backend
    # must be chosen before it loads.
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_curves(run_dir) -> str:
    """``RUN/curves.png``: the loss (and ProGrad's KL term) and the train accuracy on the noisy
    labels trained on and on the clean labels, per epoch, from the run's metrics.json."""
    run_dir = os.fspath(run_dir)
    metrics = run_metrics(run_dir, "plot", missing="not a finished run folder")
    history = metrics.get("epochs") or []
    if not history:
        raise ValueError(f"plot: {os.path.join(run_dir, METRICS)} records no epochs")
    epochs = [h["epoch"] for h in history]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(epochs, [_number(h, "loss") for h in history], marker=".", label="training loss")
    if any("kl_loss" in h for h in history):
        left.plot(epochs, [_number(h, "kl_loss") for h in history], marker=".",
                  label="KL to zero-shot (ProGrad)")
    left.set(xlabel="epoch", ylabel="loss (mean over the epoch)", title="Loss")
    left.legend(fontsize="small")
    for key, label in (("train_acc_noisy", "labels trained on (noisy)"),
                       ("train_acc_clean", "clean labels")):
        left_values = [100 * h[key] if h.get(key) is not None else math.nan for h in history]
        right.plot(epochs, left_values, marker=".", label=label)
    right.set(xlabel="epoch", ylabel="train accuracy (%)", title="Train accuracy")
    right.set_ylim(0, 100)
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"{_run_title(metrics)}: test accuracy "
                 f"{100 * (metrics.get('test_acc') or math.nan):.1f}%", fontsize="medium")
    out = os.path.join(run_dir, CURVES)
    _save(fig, out)
    return out


def _number(record: dict, key: str) -> float:
    """``record[key]``, NaN where it is absent or null (strict JSON's non-finite values)."""
    value = record.get(key)
    return math.nan if value is None else value


def _run_title(metrics: dict) -> str:
    """'coop+ls, 4 shots, symmetric label noise 0.2, seed 1' from a run's metrics."""
    fingerprints = [(metrics.get("cache") or {}).get("fingerprint")] + [
        (t.get("cache") or {}).get("fingerprint") for t in metrics.get("tasks") or []]
    fp = next((f for f in fingerprints if f), {})
    parts = [str(metrics.get("method", "run"))]
    if fp:
        parts.append(f"{fp['shots']} shots" if fp.get("shots") else "all images")
        if fp.get("noise_rate"):
            parts.append(f"{fp.get('noise_type', '')} label noise {fp['noise_rate']:g}")
        elif fp.get("noise_per_class"):
            parts.append(f"{fp.get('noise_type', '')} label noise {fp['noise_per_class']} per "
                         "class")
    parts.append(f"seed {metrics.get('seed')}")
    return ", ".join(parts)


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)


def _numeric(columns: list[str]) -> list[float] | None:
    """The columns as numbers ("4 shots" -> 4, "0.2" -> 0.2); None unless every one is."""
    xs = []
    for c in columns:
        match = re.fullmatch(r"([0-9.]+)( shots)?", c)
        if not match:
            return None
        xs.append(float(match.group(1)))
    return xs


def plot_lines(table, path: str, xlabel: str, log2: bool) -> None:
    """Accuracy against the table's numeric columns, one line per method (mean, with the
    seeds' standard deviation as error bars); zero-shot as a dashed line."""
    plt = _pyplot()
    xs = _numeric(table.columns)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label, cells in table.rows:
        points = [(x, *mean_std(c)) for x, c in zip(xs, cells) if c]
        if not points:
            continue
        px, mean, std = zip(*points)
        std = [0.0 if math.isnan(s) else s for s in std]
        style = dict(linestyle="--", color="grey") if label == "zero-shot" else dict(marker="o")
        ax.errorbar(px, mean, yerr=std, capsize=3, label=label, **style)
    if log2:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(xlabel=xlabel, ylabel=table.measure, title=table.title)
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def plot_bars(table, path: str) -> None:
    """Grouped bars: one group per column (Base/New/H, or source and targets), one bar per
    method, the seeds' standard deviation as error bars."""
    plt = _pyplot()
    rows = table.rows
    n = len(rows)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(table.columns) * max(n, 3) * 0.35 + 3), 4.5),
                           constrained_layout=True)
    for k, (label, cells) in enumerate(rows):
        means, stds = [], []
        for i in range(len(table.columns)):
            mean, std = table.stats(cells, i) if cells[i] else (math.nan, math.nan)
            means.append(mean)
            stds.append(0.0 if math.isnan(std) else std)
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(table.columns))]
        style = dict(color="lightgrey", hatch="//") if label == "zero-shot" else {}
        ax.bar(positions, means, width, yerr=stds, capsize=2, label=label, **style)
    ax.set_xticks(range(len(table.columns)), table.columns)
    ax.set(ylabel=table.measure, title=table.title)
    ax.title.set_fontsize("medium")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def sweep_plots(spec, tables, out: str) -> list[tuple[str, str]]:
    """The plots of a sweep's tables in ``out``: ``[(title, file name)]``."""
    plots = []
    for table in tables:
        if spec.protocol == "few-shot":
            xs = _numeric(table.columns)
            if xs is None or len(xs) < 2:
                continue
            against_shots = table.columns[0].endswith("shots")
            name = ("accuracy-vs-shots" if against_shots else "accuracy-vs-noise") + \
                f"-{slug(table.title, lower=True, max_length=60)}.png"
            plot_lines(table, os.path.join(out, name),
                       "training images per class (shots)" if against_shots else
                       "label-noise rate", log2=against_shots)
        else:
            name = f"bars-{slug(table.title, lower=True, max_length=60)}.png"
            plot_bars(table, os.path.join(out, name))
        plots.append((table.title, name))
    return plots
