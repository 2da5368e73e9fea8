"""A sweep's spec and its grid of runs: what ``fastprompt sweep`` reads (JSON, or YAML where
PyYAML is installed), the run folders and caches it lays out, and the mean ± std its tables and
plots report. No training here: ``fastprompt.protocols.sweep`` runs the grid,
``fastprompt.protocols.report`` tabulates it."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from fastprompt._checks import slug
from fastprompt._io import read_json
from fastprompt.data import NOISE_TYPES
from fastprompt.data.source import DataSource
from fastprompt.protocols.stats import format_number
from fastprompt.train import TrainConfig, coop_epochs

PROTOCOLS = ("few-shot", "base-to-new", "cross-dataset")
DEFAULT_SEEDS = (1, 2, 3)
EVALUATION = "evaluation.json"
SPEC_COPY = "sweep.json"
_PLUGIN = re.compile(r"^(ls|csl|isl)(\(alt\))?$")


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Method:
    """A row of the tables: its label and the TrainConfig fields it sets."""
    label: str
    overrides: dict


def parse_method(entry, where: str = "methods") -> Method:
    """A method as the spec names it: ``"coop"``, ``"dspt"``, ``"softcpt"`` with plug-ins as
    ``TrainConfig.describe`` writes them (``"dspt+isl(alt)+prograd"``, ``"coop+ls"``), or an
    object ``{"name": LABEL, "method": ..., any TrainConfig field: value}``."""
    if isinstance(entry, dict):
        entry = dict(entry)
        label = entry.pop("name", None)
        method = entry.pop("method", "coop")
        base = parse_method(method, where).overrides
        if not isinstance(label, str) or not label.strip():
            label = method
        return Method(label.strip(), {**base, **entry})
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{where}: expected a method name or object, got {entry!r}")
    parts = entry.strip().split("+")
    head = parts[0]
    if head not in ("coop", "dspt", "softcpt"):
        raise ValueError(f"{where}: {entry!r} must start with coop, dspt or softcpt")
    overrides: dict = {"learner": "softcpt" if head == "softcpt" else "coop",
                       "loss": "dspt" if head == "dspt" else "ce"}
    for part in parts[1:]:
        match = _PLUGIN.match(part)
        if match:
            overrides["targets"] = match.group(1)
            overrides["alternate"] = bool(match.group(2))
        elif part == "prograd":
            overrides["prograd"] = True
        else:
            raise ValueError(f"{where}: unknown plug-in {part!r} in {entry!r} (ls, csl, isl, "
                             "each optionally with (alt), and prograd)")
    return Method(entry.strip(), overrides)


@dataclass(frozen=True)
class Target:
    """A cross-dataset (or domain-shift) target: evaluated with its own class names."""
    name: str
    source: DataSource
    all_images: bool = False


@dataclass
class SweepSpec:
    data: DataSource
    methods: list[Method]
    protocol: str = "few-shot"
    model: str = "fastprompt-tiny"
    pretrained: str | None = None
    shots: list = field(default_factory=lambda: [None])
    noise_rates: list = field(default_factory=lambda: [0.0])
    noise_types: list = field(default_factory=lambda: ["symmetric"])
    seeds: list = field(default_factory=lambda: list(DEFAULT_SEEDS))
    views: int = 8
    train: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    device: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = [{"name": m.label, **m.overrides} for m in self.methods]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        """The spec of ``to_dict`` (a sweep folder's sweep.json)."""
        try:
            d = dict(d)
            d["data"] = DataSource.from_dict(d["data"])
            d["methods"] = [Method(m["name"], {k: v for k, v in m.items() if k != "name"})
                            for m in d["methods"]]
            d["targets"] = [Target(t["name"], DataSource.from_dict(t["source"]), t["all_images"])
                            for t in d["targets"]]
            return cls(**d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"sweep: not a sweep spec written by fastprompt ({e})") from None

    def noise_settings(self) -> list[tuple[str, float]]:
        """``(type, rate)`` pairs: the clean setting once, then every rate > 0 of every type."""
        out = [("none", 0.0)] if 0.0 in self.noise_rates else []
        out += [(t, r) for t in self.noise_types for r in self.noise_rates if r > 0]
        return out


_SPEC_KEYS = {"data", "split_file", "test_fraction", "methods", "protocol", "model", "pretrained",
              "shots", "noise_rates", "noise_types", "seeds", "views", "train", "targets",
              "device"}


def _read_spec_file(path: str) -> dict:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # optional: only YAML specs need PyYAML
        except ImportError:
            raise ValueError(f"spec: {path} is YAML, but PyYAML is not installed; install it "
                             "(pip install pyyaml) or write the spec as JSON") from None
        with open(path, encoding="utf-8") as f:
            try:
                return yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"spec: {path} is not valid YAML ({e})") from None
    return read_json(path, "spec")


def _list(d: dict, key: str, default: list, valid, what: str) -> list:
    """``d[key]`` as a non-empty list without repeats whose entries pass ``valid``."""
    value = d.get(key, default)
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise ValueError(f"spec: {key!r} is empty")
    for v in value:
        if isinstance(v, bool) or not valid(v):
            raise ValueError(f"spec: {key!r}: {v!r} is not {what}")
    if len(set(value)) != len(value):
        raise ValueError(f"spec: {key!r} lists a value twice: {value}")
    return value


def load_spec(path) -> SweepSpec:
    """Read and check a sweep spec (JSON; YAML when PyYAML is installed). Relative paths are
    relative to the spec file's folder. See docs/protocols.md for the fields."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"spec: {path} is not a file")
    d = _read_spec_file(path)
    if not isinstance(d, dict):
        raise ValueError(f"spec: {path} must hold an object (mapping)")
    unknown = sorted(set(d) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"spec: unknown field(s) {unknown}; fields: {sorted(_SPEC_KEYS)}")
    here = os.path.dirname(os.path.abspath(path))

    def resolve(p, key):
        if p is None:
            return None
        if not isinstance(p, str) or not p:
            raise ValueError(f"spec: {key!r} must be a path, got {p!r}")
        return os.path.join(here, os.path.expanduser(p))

    if "data" not in d:
        raise ValueError("spec: 'data' (the image folder to train on) is required")
    protocol = d.get("protocol", "few-shot")
    if protocol not in PROTOCOLS:
        raise ValueError(f"spec: 'protocol' must be one of {PROTOCOLS}, got {protocol!r}")
    data = DataSource.create(resolve(d["data"], "data"), split_file=d.get("split_file"),
                             test_fraction=d.get("test_fraction", 0.2),
                             subsample="base" if protocol == "base-to-new" else "all")
    methods = d.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError("spec: 'methods' must be a non-empty list")
    methods = [parse_method(m, f"spec: methods[{i}]") for i, m in enumerate(methods)]
    folders = [_label_slug(m.label) for m in methods]
    if len(set(folders)) != len(folders):
        raise ValueError(f"spec: two methods have the same name (or folder name): "
                         f"{[m.label for m in methods]}")
    train = d.get("train", {})
    if not isinstance(train, dict):
        raise ValueError("spec: 'train' must be an object of TrainConfig fields")
    # The spec sets model, pretrained and seed; each method its learner and loss.
    settable = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "pretrained", "seed"}
    for where, fields, allowed in [("train", train, settable - {"learner", "loss"})] + [
            (f"methods {m.label!r}", m.overrides, settable) for m in methods]:
        bad = sorted(set(fields) - allowed)
        if bad:
            raise ValueError(f"spec: {where}: {bad} cannot be set there; settable: "
                             f"{sorted(allowed)}")
    for m in methods:
        if m.overrides.get("learner") == "softcpt" and protocol == "base-to-new":
            raise ValueError(f"spec: methods {m.label!r}: SoftCPT trains on whole tasks; "
                             "base-to-new sweeps take coop and dspt methods")
    targets = []
    raw_targets = d.get("targets", [])
    if protocol == "cross-dataset":
        if not isinstance(raw_targets, list) or not raw_targets:
            raise ValueError("spec: a cross-dataset sweep needs 'targets': "
                             '[{"name": ..., "data": DIR}, ...]')
        for i, t in enumerate(raw_targets):
            if not isinstance(t, dict) or "data" not in t or set(t) - {"name", "data", "split_file", "all_images", "test_fraction"}:
                raise ValueError(f"spec: targets[{i}] must be an object with 'data' and optionally "
                                 "'name', 'split_file', 'test_fraction', 'all_images'")
            source = DataSource.create(resolve(t["data"], f"targets[{i}].data"),
                                       split_file=t.get("split_file"),
                                       test_fraction=t.get("test_fraction", 0.2))
            targets.append(Target(str(t.get("name") or os.path.basename(source.root)), source,
                                  bool(t.get("all_images", False))))
        if len({t.name for t in targets}) != len(targets):
            raise ValueError("spec: two targets have the same name")
    elif raw_targets:
        raise ValueError(f"spec: 'targets' belong to a cross-dataset sweep, not {protocol!r}")
    views = d.get("views", 8)
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"spec: 'views' must be an int >= 1, got {views!r}")
    spec = SweepSpec(
        data=data, methods=methods, protocol=protocol, model=d.get("model", "fastprompt-tiny"),
        pretrained=resolve(d.get("pretrained"), "pretrained"),
        shots=_list(d, "shots", [None], lambda v: v is None or isinstance(v, int) and v >= 1,
                    "a shot count >= 1 (or null: every image)"),
        noise_rates=[float(r) for r in _list(
            d, "noise_rates", [0.0], lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0,
            "a noise rate in [0, 1)")],
        noise_types=_list(d, "noise_types", ["symmetric"], lambda v: v in NOISE_TYPES,
                          f"one of {NOISE_TYPES}"),
        seeds=_list(d, "seeds", list(DEFAULT_SEEDS), lambda v: isinstance(v, int), "an int"),
        views=views, train=dict(train),
        targets=targets, device=d.get("device"))
    for setting in jobs_of(spec, "/nonexistent"):
        TrainConfig.from_dict(setting.config)  # every run's config is valid before any work
    return spec


# ---------------------------------------------------------------------------------------------
# The grid


def _label_slug(text: str) -> str:
    """A method label as a folder name ('softcpt(dspt)' -> 'softcpt-dspt')."""
    return slug(text.replace("(", "-").replace(")", ""), keep=".+-")


@dataclass(frozen=True)
class Job:
    """One run of the grid."""
    method: str
    shots: int | None
    noise_type: str
    noise_rate: float
    seed: int
    run_dir: str
    cache: str
    config: dict
    data: dict                 # the DataSource of its cache (recorded in its metrics.json)
    task: str | None = None    # SoftCPT: the data set as its one task

    @property
    def key(self) -> tuple:
        return (self.method, self.shots, self.noise_type, self.noise_rate, self.seed)

    def describe(self) -> str:
        noise = "clean" if self.noise_rate == 0 else f"{self.noise_type} {format_number(self.noise_rate)}"
        return f"{self.method}, {self.shots or 'all'} shots, {noise}, seed {self.seed}"


def cache_path(out: str, spec: SweepSpec, shots, seed: int, noise_type: str = "none",
               noise_rate: float = 0.0) -> str:
    name = (f"{_label_slug(os.path.basename(spec.data.root))}-{spec.data.subsample}-"
            f"shots{shots or 'all'}-seed{seed}-views{spec.views}")
    if noise_rate > 0:
        name += f"-{noise_type}{format_number(noise_rate)}"
    return os.path.join(out, "features", name + ".safetensors")


def jobs_of(spec: SweepSpec, out: str) -> list[Job]:
    """Every run of the grid, in the order they are trained: by shots, seed, noise, method (so
    runs sharing a cache follow each other)."""
    jobs = []
    for shots in spec.shots:
        for seed in spec.seeds:
            for noise_type, rate in spec.noise_settings():
                for m in spec.methods:
                    config = {"model": spec.model, "pretrained": spec.pretrained,
                              "epochs": coop_epochs(shots), **spec.train, **m.overrides,
                              "seed": seed}
                    run_dir = os.path.join(out, "runs", _label_slug(m.label), f"shots-{shots or 'all'}",
                                           f"noise-{noise_type}-{format_number(rate)}", f"seed-{seed}")
                    softcpt = m.overrides.get("learner") == "softcpt"
                    jobs.append(Job(m.label, shots, noise_type, rate, seed, run_dir,
                                    cache_path(out, spec, shots, seed, noise_type, rate), config,
                                    dataclasses.replace(spec.data, seed=seed).to_dict(),
                                    os.path.basename(spec.data.root) if softcpt else None))
    return jobs
