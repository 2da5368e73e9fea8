"""A sweep's report, made from its run folders alone: paper-style tables of accuracy (%) as mean ±
standard deviation over seeds, zero-shot CLIP as the first row, in ``report.md`` (with the plots
embedded) and ``report.csv`` (one line per cell, full precision, the seeds' values included).

Tables by protocol:

* few-shot: one column per shot count; with several noise rates, one table per shot count and
  noise type with one column per noise rate (the clean runs in the 0 column; under the
  per-class noise protocol a rate r is r x shots noisy labels per class, said in the header);
* base-to-new: Base, New and H = 2·B·N/(B+N) of the mean B and N (as CoCoOp's and ProGrad's
  tables; the ± of H is the standard deviation of the seeds' own H);
* cross-dataset: the source data set, each target, and the targets' average.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

from fastprompt._io import read_json, write_text_atomic
from fastprompt.protocols.plots import plot_curves, sweep_plots
from fastprompt.protocols.records import run_evaluation, run_metrics
from fastprompt.protocols.stats import format_number, harmonic_mean, mean_std
from fastprompt.protocols.sweep_grid import EVALUATION, SPEC_COPY, Job, SweepSpec, jobs_of
from fastprompt.train.files import METRICS

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
ZERO_SHOT = "zero-shot"
NOISE_PROTOCOL_LINES = {
    "rate": "Label noise (rate protocol): each training label is corrupted independently with "
            "probability the noise rate.",
    "per-class": "Label noise (per-class protocol, as PTNL and JoAPR): at noise rate r, exactly "
                 "r × shots training images of every class carry another class's label, and "
                 "every label is carried by exactly r × shots images of other classes.",
}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[list[float]]]] = field(default_factory=list)  # values per seed
    # column -> (base column, new column): its mean is the harmonic mean of theirs
    harmonic: dict[int, tuple[int, int]] = field(default_factory=dict)
    measure: str = "test accuracy (%)"   # what the values are (a plot's axis)

    def stats(self, cells: list[list[float]], column: int) -> tuple[float, float]:
        """Mean and sample standard deviation of a row's cell (NaN where undefined)."""
        mean, std = mean_std(cells[column])
        if column in self.harmonic and cells[column]:
            b, n = self.harmonic[column]
            mean = harmonic_mean(mean_std(cells[b])[0], mean_std(cells[n])[0])
        return mean, std


def run_record(job: Job) -> dict | None:
    """The numbers of one finished run (accuracies in [0, 1]); None while it is not finished."""
    if not os.path.isfile(os.path.join(job.run_dir, METRICS)):
        return None
    metrics = run_metrics(job.run_dir)
    record = {"test_acc": metrics.get("test_acc"), "zeroshot": metrics.get("zeroshot_test_acc")}
    # A label-noise method's split (NLPrompt's, JoAPR's): how clean the samples it kept in its
    # last epoch are.
    last = (metrics.get("epochs") or [{}])[-1]
    for key, value in last.items():
        if key.endswith("_kept_precision") and isinstance(value, (int, float)):
            record["kept_precision"] = value
    evaluation_path = os.path.join(job.run_dir, EVALUATION)
    if os.path.isfile(evaluation_path):
        evaluation = run_evaluation(evaluation_path)
        if "base_to_new" in evaluation:
            b = evaluation["base_to_new"]
            record.update(base=b["base_acc"], new=b["new_acc"], hm=b["hm"],
                          zs_base=b["zeroshot"]["base_acc"], zs_new=b["zeroshot"]["new_acc"],
                          zs_hm=b["zeroshot"]["hm"])
        for name, t in evaluation.get("targets", {}).items():
            record[f"target:{name}"] = t["test_acc"]
            record[f"zs_target:{name}"] = t["zeroshot_test_acc"]
    return record


def _value(record: dict, key: str) -> float | None:
    v = record.get(key)
    return None if v is None else 100.0 * v


def build_tables(spec: SweepSpec, out: str) -> list[Table]:
    """The report's tables, from the run folders under ``out``."""
    grid = jobs_of(spec, out)
    records = {job.key: run_record(job) for job in grid}
    settings = spec.noise_settings()
    by_rate = len(settings) > 1

    def values(method: str, shots, noise, key: str, zero_shot: bool = False) -> list[float]:
        """The seeds' values of ``key`` (zero-shot: from the first method's runs)."""
        out_values = []
        for seed in spec.seeds:
            m = spec.methods[0].label if zero_shot else method
            r = records.get((m, shots, *noise, seed))
            v = None if r is None else _value(r, key)
            if v is not None:
                out_values.append(v)
        return out_values

    def table(title, columns, cell) -> Table:
        """``cell(method, column index, zero_shot)`` -> values over seeds."""
        t = Table(title, columns)
        t.rows.append((ZERO_SHOT, [cell(None, i, True) for i in range(len(columns))]))
        for m in spec.methods:
            t.rows.append((m.label, [cell(m.label, i, False) for i in range(len(columns))]))
        return t

    def kept_table(title, columns, cell) -> list[Table]:
        """The clean-label share of the samples a label-noise method kept, for the methods
        that keep some (none: no table)."""
        t = Table(title, columns, measure="correct labels among the samples kept (%)")
        for m in spec.methods:
            cells = [cell(m.label, i) for i in range(len(columns))]
            if any(cells):
                t.rows.append((m.label, cells))
        return [t] if t.rows else []

    def noise_title(noise) -> str:
        return "no label noise" if noise[1] == 0 else f"{noise[0]} label noise {format_number(noise[1])}"

    def shots_title(shots) -> str:
        return f"{shots}-shot" if shots else "all training images"

    tables = []
    if spec.protocol == "few-shot":
        if by_rate:
            types = [t for t in spec.noise_types if any(n[0] == t for n in settings)]
            for shots in spec.shots:
                for kind in types:
                    cols = [n for n in settings if n[0] in (kind, "none")]
                    tables.append(table(
                        f"Accuracy (%) against {kind} label-noise rate, {shots_title(shots)}",
                        [format_number(n[1]) for n in cols],
                        lambda m, i, zs, cols=cols, shots=shots: values(
                            m, shots, cols[i], "zeroshot" if zs else "test_acc", zs)))
                    tables += kept_table(
                        f"Correct labels among the samples kept (%) against {kind} label-noise "
                        f"rate, {shots_title(shots)}",
                        [format_number(n[1]) for n in cols],
                        lambda m, i, cols=cols, shots=shots: values(
                            m, shots, cols[i], "kept_precision"))
        else:
            noise = settings[0]
            tables.append(table(
                f"Few-shot accuracy (%), {noise_title(noise)}",
                [f"{s} shots" if s else "all" for s in spec.shots],
                lambda m, i, zs: values(m, spec.shots[i], noise,
                                        "zeroshot" if zs else "test_acc", zs)))
            tables += kept_table(
                f"Correct labels among the samples kept (%), {noise_title(noise)}",
                [f"{s} shots" if s else "all" for s in spec.shots],
                lambda m, i: values(m, spec.shots[i], noise, "kept_precision"))
    elif spec.protocol == "base-to-new":
        keys = ("base", "new", "hm")
        for shots in spec.shots:
            for noise in settings:
                tables.append(table(
                    f"Base-to-new generalisation (%), {shots_title(shots)}, {noise_title(noise)}",
                    ["Base", "New", "H"],
                    lambda m, i, zs, shots=shots, noise=noise: values(
                        m, shots, noise, ("zs_" if zs else "") + keys[i], zs)))
                tables[-1].harmonic[2] = (0, 1)
    else:
        names = [t.name for t in spec.targets]
        for shots in spec.shots:
            for noise in settings:
                def cell(m, i, zs, shots=shots, noise=noise):
                    if i == 0:
                        return values(m, shots, noise, "zeroshot" if zs else "test_acc", zs)
                    if i <= len(names):
                        key = f"{'zs_' if zs else ''}target:{names[i - 1]}"
                        return values(m, shots, noise, key, zs)
                    per_seed = [values(m, shots, noise, f"{'zs_' if zs else ''}target:{n}", zs)
                                for n in names]
                    if any(len(v) != len(per_seed[0]) for v in per_seed):
                        return []
                    return [sum(vs) / len(vs) for vs in zip(*per_seed)]
                source = os.path.basename(spec.data.root)
                tables.append(table(
                    f"Cross-dataset transfer (%), trained on {source}, {shots_title(shots)}, "
                    f"{noise_title(noise)}",
                    [f"{source} (source)", *names, "average"], cell))
    return tables


def format_cell(table: Table, cells: list[list[float]], column: int) -> str:
    if not cells[column]:
        return "-"
    mean, std = table.stats(cells, column)
    return f"{mean:.1f}" if len(cells[column]) < 2 else f"{mean:.1f} ± {std:.1f}"


def markdown(tables: list[Table], spec: SweepSpec, plots: list[tuple[str, str]]) -> str:
    noise = ([NOISE_PROTOCOL_LINES[spec.noise_protocol]]
             if any(rate > 0 for rate in spec.noise_rates) else [])
    lines = [f"# Sweep report: {spec.protocol}", "",
             f"Data: `{spec.data.root}`; model {spec.model} "
             f"({spec.pretrained or 'random weights'}); seeds {spec.seeds}; "
             f"{spec.views} augmented views per training image.",
             "Accuracy in %, mean ± sample standard deviation over the seeds (n - 1); `-`: no "
             "finished run yet.", *noise, ""]
    for t in tables:
        lines += [f"## {t.title}", "",
                  "| method | " + " | ".join(t.columns) + " |",
                  "|---|" + "---:|" * len(t.columns)]
        for label, cells in t.rows:
            lines.append(f"| {label} | " + " | ".join(
                format_cell(t, cells, i) for i in range(len(t.columns))) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
    for title, name in plots:
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def csv_text(tables: list[Table], spec: SweepSpec) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "column", "mean", "std", "n", "values"])
    for t in tables:
        for label, cells in t.rows:
            for i, (column, values) in enumerate(zip(t.columns, cells)):
                mean, std = t.stats(cells, i)
                writer.writerow([t.title, label, column, "" if not values else repr(mean),
                                 "" if len(values) < 2 else repr(std), len(values),
                                 " ".join(repr(v) for v in values)])
    return buffer.getvalue()


def write_report(out, log=print) -> str:
    """Write ``out/report.md``, ``out/report.csv`` and the plots from the sweep folder ``out``
    (its sweep.json and run folders); returns the report's path."""
    out = os.path.abspath(os.fspath(out))
    spec_path = os.path.join(out, SPEC_COPY)
    if not os.path.isfile(spec_path):
        raise ValueError(f"sweep: {out} has no {SPEC_COPY}; is it a sweep folder?")
    try:
        spec = SweepSpec.from_dict(read_json(spec_path, "sweep"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e} ({spec_path})") from None
    tables = build_tables(spec, out)
    plots = sweep_plots(spec, tables, out)
    write_text_atomic(os.path.join(out, REPORT_MD), markdown(tables, spec, plots))
    write_text_atomic(os.path.join(out, REPORT_CSV), csv_text(tables, spec))
    log(f"report: {os.path.join(out, REPORT_MD)} (and {REPORT_CSV}); plots: "
        + (", ".join(os.path.join(out, name) for _, name in plots) or "none"))
    return os.path.join(out, REPORT_MD)


def redraw(paths) -> list[str]:
    """``fastprompt plot``: each path's plots again; a run folder's curves.png, a sweep
    folder's report and plots (and every run's curves.png in it)."""
    written = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, SPEC_COPY)):
            for folder, _, files in sorted(os.walk(os.path.join(path, "runs"))):
                if METRICS in files:
                    written.append(plot_curves(folder))
            written.append(write_report(path, log=lambda *_: None))
        else:
            written.append(plot_curves(path))
    return written
