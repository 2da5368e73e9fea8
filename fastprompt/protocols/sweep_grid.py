"""A sweep's spec and its grid of runs: what ``fastprompt sweep`` reads (JSON, or YAML where
PyYAML is installed), the run folders and caches it lays out, and the mean ± std its tables and
plots report. No training here: ``fastprompt.protocols.sweep`` runs the grid,
``fastprompt.protocols.report`` tabulates it."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from fastprompt._checks import check_int, check_seed, slug
from fastprompt._io import read_json
from fastprompt.data import DEFAULT_TEST_FRACTION, NOISE_TYPES
from fastprompt.data.sampling import check_noise_rate
from fastprompt.data.source import DataSource
from fastprompt.models.factory import check_device, check_model_name
from fastprompt.protocols.stats import format_number
from fastprompt.train import LEARNERS, LOSSES, TrainConfig, coop_epochs
from fastprompt.train.online import is_online

PROTOCOLS = ("few-shot", "base-to-new", "cross-dataset")
# How a noise rate r of the spec corrupts labels: each independently with probability r
# (add_label_noise), or exactly r x shots per class (add_label_noise_per_class; PTNL, JoAPR).
NOISE_PROTOCOLS = ("rate", "per-class")
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


# A method's name before its plug-ins: CoOp's by loss, or a learner with its loss in brackets.
_HEAD = re.compile(r"^([a-z]+)(?:\(([a-z]+)\))?$")
_COOP_LOSSES = {"coop": "ce", "dspt": "dspt", "gce": "gce", "mae": "mae"}
_FLAGS = ("prograd", "dept", "nlprompt", "joapr")


def parse_method(entry, where: str = "methods") -> Method:
    """A method as the spec names it, as ``TrainConfig.describe`` writes it: CoOp by its loss
    (``coop``, ``dspt``, ``gce``, ``mae``), a plug-in alone as its paper trains it (``nlprompt``,
    ``joapr``: CoOp with it) or a learner (``softcpt``, ``kgcoop``, ``cocoop``,
    ...) with a loss in brackets (``kgcoop(dspt)``), then plug-ins (``+ls``, ``+isl(alt)``,
    ``+prograd``, ``+dept``, ``+nlprompt``, ``+joapr``): ``"dspt+isl(alt)+prograd"``,
    ``"cocoop(gce)+dept"``; or an object ``{"name": LABEL, "method": ..., any TrainConfig
    field: value}``. A learner starts from its official config (``TrainConfig.for_learner``)."""
    if isinstance(entry, dict):
        entry = dict(entry)
        label = entry.pop("name", None)
        method = entry.pop("method", "coop")
        base = parse_method(method, f"{where}.method").overrides
        if label is not None and not isinstance(label, str):
            raise ValueError(f"{where}.name: expected a str, got {type(label).__name__} "
                             f"{label!r:.60}")
        if not label or not label.strip():
            label = method
        return Method(label.strip(), {**base, **entry})
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{where}: expected a method name or object, got {entry!r}")
    parts = entry.strip().split("+")
    head = _HEAD.match(parts[0])
    if head and head.group(1) in _COOP_LOSSES and head.group(2) is None:
        overrides: dict = {"learner": "coop", "loss": _COOP_LOSSES[head.group(1)]}
    elif head and head.group(1) in _FLAGS and head.group(2) is None:
        # A plug-in's own name is its paper's method: CoOp with it (``nlprompt``, ``joapr``).
        overrides = {"learner": "coop", "loss": "ce", head.group(1): True}
    elif head and head.group(1) in LEARNERS and head.group(1) != "coop":
        if is_online(head.group(1)):
            raise ValueError(f"{where}: {entry!r}: {head.group(1)} trains online (its prompts "
                             "run in the image tower) and sweeps train on feature caches; train "
                             f"it with fastprompt train --learner {head.group(1)}")
        overrides = {"learner": head.group(1), "loss": head.group(2) or "ce"}
        if overrides["loss"] not in LOSSES:
            raise ValueError(f"{where}: unknown loss {head.group(2)!r} in {entry!r} (one of "
                             f"{', '.join(LOSSES)})")
    else:
        raise ValueError(f"{where}: {entry!r} must start with coop, dspt, gce or mae (CoOp by "
                         f"its loss), a plug-in ({', '.join(_FLAGS)}: CoOp with it) or a learner ({', '.join(sorted(set(LEARNERS) - {'coop'}))}"
                         ", optionally with a loss in brackets: kgcoop(dspt))")
    for part in parts[1:]:
        match = _PLUGIN.match(part)
        if match:
            overrides["targets"] = match.group(1)
            overrides["alternate"] = bool(match.group(2))
        elif part in _FLAGS:
            overrides[part] = True
        else:
            raise ValueError(f"{where}: unknown plug-in {part!r} in {entry!r} (ls, csl, isl, "
                             f"each optionally with (alt), and {', '.join(_FLAGS)})")
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
    noise_protocol: str = "rate"
    seeds: list = field(default_factory=lambda: list(DEFAULT_SEEDS))
    views: int = 8
    train: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    device: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = [{"name": m.label, **m.overrides} for m in self.methods]
        if self.noise_protocol == "rate":
            # The default is left out: a sweep folder made before the per-class protocol keeps
            # a sweep.json equal to its spec's, and its runs.
            del d["noise_protocol"]
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

    def noise_per_class(self, shots, rate: float) -> int | None:
        """Under the per-class protocol, the noisy labels per class of ``rate`` at ``shots``
        (``rate x shots``, whole: checked when the spec is read); None under the rate
        protocol and for the clean setting."""
        if self.noise_protocol != "per-class" or rate == 0:
            return None
        return round(rate * shots)


_SPEC_KEYS = {"data", "split_file", "test_fraction", "methods", "protocol", "model", "pretrained",
              "shots", "noise_rates", "noise_types", "noise_protocol", "seeds", "views", "train",
              "targets", "device"}
_TARGET_KEYS = {"name", "data", "split_file", "all_images", "test_fraction"}
# The spec sets model, pretrained and seed; each method its learner and loss.
_SETTABLE = frozenset({f.name for f in dataclasses.fields(TrainConfig)} -
                      {"model", "pretrained", "seed"})


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


def _list(d: dict, key: str, default: list, check) -> list:
    """``d[key]`` (one value or a list of them) as a non-empty list without repeats, each entry
    ``check(value, "key[i]")``-ed."""
    value = d.get(key, default)
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise ValueError(f"{key}: is empty")
    value = [check(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if len(set(value)) != len(value):
        raise ValueError(f"{key}: lists a value twice: {value}")
    return value


def _shots(value, where: str):
    return None if value is None else check_int(where, value, 1)


def _check_per_class_counts(shots: list, rates: list) -> None:
    """Under the per-class protocol every noise rate times every shot count must be a whole
    number of images (PTNL's 12.5/25/50% of 16 shots: 2, 4, 8 per class)."""
    for i, rate in enumerate(rates):
        if rate == 0:
            continue
        for j, n in enumerate(shots):
            if n is None:
                raise ValueError(f"noise_rates: the per-class noise protocol corrupts rate x "
                                 f"shots images per class, so it needs a number of shots, got "
                                 f"shots[{j}] null")
            if not math.isclose(rate * n, round(rate * n), rel_tol=0, abs_tol=1e-9):
                raise ValueError(f"noise_rates[{i}]: {format_number(rate)} x shots[{j}] {n} = "
                                 f"{rate * n:g} images per class, not a whole number (the "
                                 "per-class noise protocol corrupts exactly rate x shots)")


def _one_of(choices):
    def check(value, where: str):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{where}: must be one of {choices}, got {value!r:.60}")
        return value
    return check


def _method_folder(label: str, where: str, taken: dict) -> None:
    """Refuse a label whose folder under ``runs/`` is not one ordinary path component of its
    own (empty, ``.``/``..``, hidden, too long, or another method's)."""
    folder = _label_slug(label)
    if not folder or folder.startswith(".") or len(folder.encode()) > 200:
        raise ValueError(f"{where}: {label!r:.80} gives the run folder name {folder!r:.80}: "
                         "empty, hidden or over 200 characters; name it with letters and digits")
    if folder in taken:
        raise ValueError(f"{where}: {label!r:.80} has the run folder name {folder!r} of "
                         f"{taken[folder]}; name the methods apart")
    taken[folder] = where


def _check_config(config: dict, sources: list[tuple[str, dict]]) -> None:
    """``TrainConfig`` of ``config``; a refusal names the field by where the spec sets it
    (``methods[1].epochs``, ``train.batch_size``)."""
    try:
        TrainConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        field_name = str(e).split(":", 1)[0]
        where = next((w for w, fields in sources if field_name in fields), None)
        raise type(e)(f"{where}.{e}" if where else str(e)) from None


def _existing(path: str, key: str, folder: bool) -> str:
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise ValueError(f"{key}: {path} is not {'a folder' if folder else 'a file'}")
    return path


def _source(d: dict, where: str, resolve, subsample: str = "all") -> DataSource:
    """The ``DataSource`` of a spec's ``data`` (``where``: "" or "targets[i]."); the folder and
    split file must exist."""
    root = resolve(d["data"], f"{where}data")
    try:
        source = DataSource.create(root, split_file=d.get("split_file"),
                                   test_fraction=d.get("test_fraction", DEFAULT_TEST_FRACTION),
                                   subsample=subsample)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}{e}") from None
    _existing(source.root, f"{where}data", folder=True)
    if source.split_file is not None:
        _existing(source.split_file, f"{where}split_file", folder=False)
    return source


def load_spec(path) -> SweepSpec:
    """Read and check a sweep spec (JSON; YAML when PyYAML is installed). Relative paths are
    relative to the spec file's folder. See docs/protocols.md for the fields.

    Everything is checked here, before a sweep creates anything: the fields' types and values
    (a refusal names the file and the field, ``methods[1].epochs``), every run's TrainConfig,
    that the data folders, split files and weights file exist, the model name and the device."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"spec: {path} is not a file")
    d = _read_spec_file(path)
    try:
        return _checked_spec(d, os.path.dirname(os.path.abspath(path)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {path}: {e}") from None


def _checked_spec(d, here: str) -> SweepSpec:
    if not isinstance(d, dict):
        raise ValueError("must hold an object (mapping)")
    unknown = sorted(set(d) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; fields: {sorted(_SPEC_KEYS)}")

    def resolve(p, key):
        if p is None:
            return None
        if not isinstance(p, str) or not p:
            raise ValueError(f"{key}: must be a path, got {p!r:.60}")
        return os.path.join(here, os.path.expanduser(p))

    if "data" not in d:
        raise ValueError("'data' (the image folder to train on) is required")
    protocol = _one_of(PROTOCOLS)(d.get("protocol", "few-shot"), "protocol")
    data = _source(d, "", resolve, "base" if protocol == "base-to-new" else "all")
    methods = d.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError("'methods' must be a non-empty list")
    methods = [parse_method(m, f"methods[{i}]") for i, m in enumerate(methods)]
    folders: dict = {}
    for i, m in enumerate(methods):
        _method_folder(m.label, f"methods[{i}].name", folders)
    train = d.get("train", {})
    if not isinstance(train, dict):
        raise ValueError("train: must be an object of TrainConfig fields")
    for where, fields, allowed in [("train", train, _SETTABLE - {"learner", "loss"})] + [
            (f"methods[{i}]", m.overrides, _SETTABLE) for i, m in enumerate(methods)]:
        bad = sorted(set(fields) - allowed)
        if bad:
            raise ValueError(f"{where}: {bad} cannot be set there; settable: {sorted(allowed)}")
    for i, m in enumerate(methods):
        if m.overrides.get("learner") == "softcpt" and protocol == "base-to-new":
            raise ValueError(f"methods[{i}]: {m.label!r}: SoftCPT trains on whole tasks; "
                             "base-to-new sweeps take coop and dspt methods")
    targets = []
    raw_targets = d.get("targets", [])
    if protocol == "cross-dataset":
        if not isinstance(raw_targets, list) or not raw_targets:
            raise ValueError("a cross-dataset sweep needs 'targets': "
                             '[{"name": ..., "data": DIR}, ...]')
        for i, t in enumerate(raw_targets):
            if not isinstance(t, dict) or "data" not in t or set(t) - _TARGET_KEYS:
                raise ValueError(f"targets[{i}]: must be an object with 'data' and optionally "
                                 "'name', 'split_file', 'test_fraction', 'all_images'")
            source = _source(t, f"targets[{i}].", resolve)
            name = t.get("name")
            if name is not None and not isinstance(name, str):
                raise ValueError(f"targets[{i}].name: expected a str, got {name!r:.60}")
            all_images = t.get("all_images", False)
            if not isinstance(all_images, bool):
                raise ValueError(f"targets[{i}].all_images: expected a bool, got "
                                 f"{all_images!r:.60}")
            targets.append(Target(name or os.path.basename(source.root), source, all_images))
        if len({t.name for t in targets}) != len(targets):
            raise ValueError("targets: two targets have the same name")
    elif raw_targets:
        raise ValueError(f"targets: belong to a cross-dataset sweep, not {protocol!r}")
    model = d.get("model", "fastprompt-tiny")
    check_model_name(model, "model")
    pretrained = resolve(d.get("pretrained"), "pretrained")
    if pretrained is not None:
        _existing(pretrained, "pretrained", folder=False)
    device = d.get("device")
    if device is not None:
        check_device(device, "device")
    spec = SweepSpec(
        data=data, methods=methods, protocol=protocol, model=model, pretrained=pretrained,
        shots=_list(d, "shots", [None], _shots),
        noise_rates=_list(d, "noise_rates", [0.0], check_noise_rate),
        noise_types=_list(d, "noise_types", ["symmetric"], _one_of(NOISE_TYPES)),
        noise_protocol=_one_of(NOISE_PROTOCOLS)(d.get("noise_protocol", "rate"),
                                                "noise_protocol"),
        seeds=_list(d, "seeds", list(DEFAULT_SEEDS), check_seed),
        views=check_int("views", d.get("views", 8), 1), train=dict(train),
        targets=targets, device=device)
    if spec.noise_protocol == "per-class":
        _check_per_class_counts(spec.shots, spec.noise_rates)
    for i, m in enumerate(methods):  # every run's config is valid before any work
        for shots in spec.shots:
            _check_config(run_config(spec, m, shots, spec.seeds[0]),
                          [(f"methods[{i}]", m.overrides), ("train", train)])
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
    noise_per_class: int | None = None   # the per-class protocol's count of noise_rate

    @property
    def key(self) -> tuple:
        return (self.method, self.shots, self.noise_type, self.noise_rate, self.seed)

    def describe(self) -> str:
        noise = "clean" if self.noise_rate == 0 else f"{self.noise_type} {format_number(self.noise_rate)}"
        if self.noise_per_class is not None:
            noise += f" ({self.noise_per_class} per class)"
        return f"{self.method}, {self.shots or 'all'} shots, {noise}, seed {self.seed}"


def cache_path(out: str, spec: SweepSpec, shots, seed: int, noise_type: str = "none",
               noise_rate: float = 0.0) -> str:
    """The cache of a (shots, seed, noise) of the grid; a per-class cache is named by its count
    (``-<type>-k<K>``), never as a rate cache."""
    name = (f"{_label_slug(os.path.basename(spec.data.root))}-{spec.data.subsample}-"
            f"shots{shots or 'all'}-seed{seed}-views{spec.views}")
    per_class = spec.noise_per_class(shots, noise_rate)
    if per_class is not None:
        name += f"-{noise_type}-k{per_class}"
    elif noise_rate > 0:
        name += f"-{noise_type}{format_number(noise_rate)}"
    return os.path.join(out, "features", name + ".safetensors")


def run_config(spec: SweepSpec, method: Method, shots, seed: int) -> dict:
    """The TrainConfig fields of a run: its learner's official config (CoOp's epoch count for
    ``shots`` where the learner sets none), then the spec's ``train``, then the method's."""
    defaults = LEARNERS[method.overrides.get("learner", "coop")].defaults
    return {"epochs": coop_epochs(shots), **defaults, "model": spec.model,
            "pretrained": spec.pretrained, **spec.train, **method.overrides, "seed": seed}


def jobs_of(spec: SweepSpec, out: str) -> list[Job]:
    """Every run of the grid, in the order they are trained: by shots, seed, noise, method (so
    runs sharing a cache follow each other)."""
    jobs = []
    for shots in spec.shots:
        for seed in spec.seeds:
            for noise_type, rate in spec.noise_settings():
                per_class = spec.noise_per_class(shots, rate)
                noise = f"noise-{noise_type}-" + (format_number(rate) if per_class is None
                                                  else f"k{per_class}")
                for m in spec.methods:
                    config = run_config(spec, m, shots, seed)
                    run_dir = os.path.join(out, "runs", _label_slug(m.label), f"shots-{shots or 'all'}",
                                           noise, f"seed-{seed}")
                    softcpt = m.overrides.get("learner") == "softcpt"
                    jobs.append(Job(m.label, shots, noise_type, rate, seed, run_dir,
                                    cache_path(out, spec, shots, seed, noise_type, rate), config,
                                    dataclasses.replace(spec.data, seed=seed).to_dict(),
                                    os.path.basename(spec.data.root) if softcpt else None,
                                    per_class))
    return jobs
