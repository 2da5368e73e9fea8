"""A sweep spec is checked whole when it is read, before anything is created: each refusal names
the spec file and the field by its path in the spec (``methods[1].epochs``, ``seeds[2]``), and
what the spec names (data, model, weights, device) must exist (issue 23, items 8, 9, 11, 19, 20
and 21)."""
import json
import os

import pytest

from fastprompt.data.sampling import check_noise_rate
from fastprompt.protocols.sweep_grid import SweepSpec, cache_path, jobs_of, load_spec


@pytest.fixture(scope="module")
def world(shapes_data, tiny_weights):
    root, _ = shapes_data(4, images_per_class=3, test_images_per_class=2, data_seed=5)
    return str(root), tiny_weights


def _spec(world, tmp_path, **fields):
    root, weights = world
    spec = {"data": root, "pretrained": weights, "views": 1, "methods": ["coop"],
            "train": {"epochs": 1, "n_ctx": 2}, **fields}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


REFUSED = [
    # item 11: types, by their path in the spec
    ({"methods": ["coop", {"method": "dspt", "epochs": "3"}]},
     "methods[1].epochs: expected an int, got str '3'"),
    ({"train": {"batch_size": "x"}}, "train.batch_size: expected an int, got str 'x'"),
    ({"train": {"batch_size": 0}}, "train.batch_size: must be at least 1"),
    ({"methods": [{"method": "coop", "epochs": 0}]}, "methods[0].epochs: must be at least 1"),
    ({"methods": [{"method": "coop", "alternate": "yes"}]},
     "methods[0].alternate: expected a bool, got str 'yes'"),
    ({"train": {"lr": "0.1"}}, "train.lr: expected a number, got str '0.1'"),
    ({"methods": [{"name": 5, "method": "coop"}]}, "methods[0].name: expected a str"),
    ({"seeds": [1, 2, "3"]}, "seeds[2]: expected an int"),
    ({"shots": [1, "2"]}, "shots[1]: expected an int >= 1"),
    ({"views": "8"}, "views: expected an int >= 1"),
    ({"noise_types": ["symmetric", 3]}, "noise_types[1]: must be one of"),
    ({"protocol": ["few-shot"]}, "protocol: must be one of"),
    ({"protocol": "cross-dataset", "targets": [{"data": 5}]}, "targets[0].data: must be a path"),
    # item 20: a method's folder must be one safe path component, and its own
    ({"methods": [{"name": "..", "method": "coop"}]}, "methods[0].name: '..'"),
    ({"methods": [{"name": ".", "method": "coop"}]}, "methods[0].name: '.'"),
    ({"methods": [{"name": "!!!", "method": "coop"}]}, "methods[0].name: '!!!'"),
    ({"methods": [{"name": ".hidden", "method": "coop"}]}, "methods[0].name: '.hidden'"),
    ({"methods": ["coop", {"name": "coop!", "method": "dspt"}]}, "methods[1].name: 'coop!'"),
    # item 9: seeds outside the one range
    ({"seeds": [1, 10**23]}, "seeds[1]: expected an int in [0, 2**32)"),
    ({"seeds": [-1]}, "seeds[0]: expected an int in [0, 2**32)"),
    ({"seeds": [1, 1.5]}, "seeds[1]: expected an int in [0, 2**32)"),
    # item 21: the one noise-rate range
    ({"noise_rates": [0.0, 1.5]}, "noise_rates[1]: must lie in [0, 1]"),
    # the per-class noise protocol: K = rate x shots, a whole number of images per class
    ({"noise_protocol": "counts"}, "noise_protocol: must be one of ('rate', 'per-class')"),
    ({"noise_protocol": "per-class", "noise_rates": [0.0, 0.25]},
     "noise_rates: the per-class noise protocol corrupts rate x shots images per class, so it "
     "needs a number of shots, got shots[0] null"),
    ({"noise_protocol": "per-class", "shots": [16, 4], "noise_rates": [0.0, 0.125]},
     "noise_rates[1]: 0.125 x shots[1] 4 = 0.5 images per class, not a whole number"),
    # item 8: the device
    ({"device": "tpu"}, "device: 'tpu' is not a device"),
    ({"device": 7}, "device: expected a device name"),
    ({"device": "cuda:x"}, "device: 'cuda:x' is not a device"),
    # item 19: what the spec names must exist, found before anything is created
    ({"data": "no-such-folder"}, "data: "),
    ({"split_file": "split_zhou_None.json"}, "split_file: "),
    ({"test_fraction": 1.5}, "test_fraction: must lie in [0, 1)"),
    ({"test_fraction": "a lot"}, "test_fraction: expected a number"),
    ({"model": "ViT-Nope-16"}, "model: unknown open_clip model 'ViT-Nope-16'"),
    ({"model": 16}, "model: expected a str"),
    ({"pretrained": "missing.safetensors"}, "pretrained: "),
    ({"protocol": "cross-dataset", "targets": [{"data": "nowhere"}]}, "targets[0].data: "),
    ({"protocol": "cross-dataset", "targets": [{"data": ".", "test_fraction": -1}]},
     "targets[0].test_fraction: must lie in [0, 1)"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[m for _, m in REFUSED])
def test_a_bad_spec_is_refused_naming_the_file_and_the_field(world, tmp_path, fields, message):
    path = _spec(world, tmp_path, **fields)
    with pytest.raises(ValueError) as refused:
        load_spec(path)
    assert str(refused.value).startswith(f"spec {path}: "), str(refused.value)
    assert message in str(refused.value), str(refused.value)


def test_method_folders_are_single_components_under_runs(world, tmp_path):
    spec = load_spec(_spec(world, tmp_path, methods=[{"name": "a/b (x)", "method": "coop"},
                                                     {"name": "v1.2+ls", "method": "coop+ls"}]))
    runs = tmp_path / "out" / "runs"
    for job in jobs_of(spec, str(tmp_path / "out")):
        assert (tmp_path / "out").joinpath(job.run_dir).parents[3] == runs, job.run_dir


def test_one_noise_rate_range_for_spec_library_and_flag(world, tmp_path):
    """[0, 1] everywhere: a spec takes the rate 1 that `cache --noise-rate 1` and
    add_label_noise take, and the same check refuses what is outside."""
    assert load_spec(_spec(world, tmp_path, noise_rates=[0.0, 1.0])).noise_rates == [0.0, 1.0]
    assert check_noise_rate(1, "x") == 1.0
    for rate in (-0.1, 1.01, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^x: must lie in \[0, 1\]"):
            check_noise_rate(rate, "x")
    with pytest.raises(TypeError, match="^x: expected a number"):
        check_noise_rate("0.5", "x")


def test_per_class_noise_names_its_caches_and_runs_by_the_count(world, tmp_path):
    """Under the per-class protocol a rate r is r x shots noisy labels per class, in the names
    of its caches and run folders, so none is taken for a rate run or cache; the rate
    protocol's names and sweep.json are as before it existed."""
    fields = dict(shots=[2, 4], noise_rates=[0.0, 0.5], noise_types=["symmetric", "pairflip"],
                  seeds=[1])
    per_class = load_spec(_spec(world, tmp_path, noise_protocol="per-class", **fields))
    rate = load_spec(_spec(world, tmp_path, **fields))
    out = str(tmp_path / "out")
    names = {(j.shots, j.noise_type): (os.path.relpath(j.run_dir, out), os.path.basename(j.cache))
             for j in jobs_of(per_class, out) if j.noise_rate}
    assert names[(2, "symmetric")][0] == "runs/coop/shots-2/noise-symmetric-k1/seed-1"
    assert names[(2, "symmetric")][1].endswith("-shots2-seed1-views1-symmetric-k1.safetensors")
    assert names[(4, "pairflip")][0] == "runs/coop/shots-4/noise-pairflip-k2/seed-1"
    assert names[(4, "pairflip")][1].endswith("-shots4-seed1-views1-pairflip-k2.safetensors")
    assert [j.describe() for j in jobs_of(per_class, out) if j.noise_rate][0] == \
        "coop, 2 shots, symmetric 0.5 (1 per class), seed 1"
    rate_jobs = {j.key: j for j in jobs_of(rate, out)}
    for job in jobs_of(per_class, out):
        same = rate_jobs[job.key]
        assert (job.run_dir == same.run_dir) == (job.cache == same.cache) == (job.noise_rate == 0)
    assert os.path.basename(cache_path(out, rate, 2, 1, "symmetric", 0.5)).endswith(
        "-shots2-seed1-views1-symmetric0.5.safetensors")
    assert "noise_protocol" not in rate.to_dict()
    assert per_class.to_dict()["noise_protocol"] == "per-class"
    assert SweepSpec.from_dict(per_class.to_dict()).noise_protocol == "per-class"
    assert SweepSpec.from_dict(rate.to_dict()).noise_protocol == "rate"


def test_per_class_counts_are_whole_despite_float_rounding(world, tmp_path):
    spec = load_spec(_spec(world, tmp_path, noise_protocol="per-class", shots=[10],
                           noise_rates=[0.3, 0.7]))   # 0.3 * 10 = 3.0000000000000004
    assert [spec.noise_per_class(10, r) for r in (0.0, 0.3, 0.7)] == [None, 3, 7]


def test_the_specs_in_the_docs_are_valid(world, tmp_path):
    """Every sweep spec docs/protocols.md shows is read without a refusal (its data folder,
    split file and weights replaced by files the test creates)."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocols.md")).read()
    blocks = [json.loads(b.split("```", 1)[0]) for b in text.split("```json\n")[1:]]
    specs = [b for b in blocks if "methods" in b]
    assert len(specs) >= 3
    root, weights = world
    for i, spec in enumerate(specs):
        split = tmp_path / f"split-{i}.json"
        split.write_text("{}")
        spec = {**spec, "data": root, "pretrained": weights}
        if "split_file" in spec:
            spec["split_file"] = str(split)
        path = tmp_path / f"spec-{i}.json"
        path.write_text(json.dumps(spec))
        assert load_spec(str(path)).methods, spec
