"""fastprompt.serve and ``fastprompt predict`` with only onnxruntime, numpy and Pillow: each runs in
a subprocess where importing torch (or anything else outside the ``serve`` extra) raises."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fastprompt.export
import fastprompt.serve
from onnxlib import SCALE, truth

# Everything the `train` extra installs; the `serve` extra has none of it.
BLOCKED = ("torch", "torchvision", "open_clip", "triton", "onnx", "onnxscript", "safetensors",
           "tqdm", "matplotlib", "fastprompt._C")
BLOCKER = f"""
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError(f"{{name}} is blocked in this test (serving must not need it)")
        return None

sys.meta_path.insert(0, _Blocker())
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker failed: torch imported")
"""


def run_blocked(body: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + body, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_serve_runs_without_torch(tiny, class_embeddings, tiny_export, image_files):
    result = run_blocked("""
import json, sys
from fastprompt.serve import OnnxClassifier
clf = OnnxClassifier(sys.argv[1], batch_size=2)
probs = clf.predict_proba(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "open_clip"))
print(json.dumps({"probs": probs.tolist(), "loaded": loaded}))
""", tiny_export[0], *image_files)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["loaded"] == []
    model, preprocess_val = tiny
    x = torch.stack([preprocess_val(Image.open(p).convert("RGB")) for p in image_files])
    _, probs_true = truth(model.visual, class_embeddings, SCALE, x)
    assert np.abs(np.array(out["probs"]) - probs_true.numpy()).max() <= 1e-4


# What fastprompt.serve exported when it was one module: its ``__all__`` stays this list.
SERVE_ALL = ["CPU", "CUDA", "ImagePreprocessor", "OnnxClassifier", "available_cpus",
             "cpu_description", "create_session", "default_providers", "list_images",
             "read_image_list", "resolve_model_path", "session_options"]
# Importable from fastprompt.serve as before, outside ``__all__`` as before.
SERVE_ALSO = ["IMAGE_EXTENSIONS", "ISA_FLAGS", "ModelInfo", "read_metadata_props"]
SERVE_MODULES = ["classifier", "images", "metadata", "preprocess", "session"]


def test_serve_module_reexports():
    assert sorted(fastprompt.serve.__all__) == SERVE_ALL
    for name in SERVE_ALL + SERVE_ALSO:
        value = getattr(fastprompt.serve, name)
        if callable(value):  # defined in the serving package itself, not borrowed from export
            assert value.__module__.startswith("fastprompt.serve."), (name, value.__module__)
    # The export side defines none of serving's names: one place for each.
    assert not set(fastprompt.export.__all__) & set(SERVE_ALL + SERVE_ALSO)


def test_serve_public_api_resolves_without_torch():
    result = run_blocked("""
import importlib, json, sys
import fastprompt.serve as serve
from fastprompt.serve import *  # noqa: F403
for module in sys.argv[1:]:
    importlib.import_module("fastprompt.serve." + module)
names = {n: type(getattr(serve, n)).__name__ for n in serve.__all__ + %r}
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("torch", "onnx", "open_clip", "tqdm")
                or m.startswith("fastprompt.export"))
print(json.dumps({"all": serve.__all__, "names": names, "loaded": loaded}))
""" % SERVE_ALSO, *SERVE_MODULES)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert sorted(out["all"]) == SERVE_ALL
    assert sorted(out["names"]) == sorted(SERVE_ALL + SERVE_ALSO)
    assert out["names"]["OnnxClassifier"] == "type" and out["names"]["CPU"] == "str"
    assert out["loaded"] == []  # no torch, onnx, open_clip, tqdm, nor anything of export


def test_cli_predict_runs_without_torch(tiny_export, image_files):
    result = run_blocked("""
import runpy, sys
sys.argv = ["fastprompt", "predict", *sys.argv[1:]]
runpy.run_module("fastprompt", run_name="__main__")
""", tiny_export[0], *image_files[:2], "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [o["image"] for o in out] == [str(p) for p in image_files[:2]]
    assert all(len(o["top_k"]) == 2 for o in out)


def test_serve_extra_installs_only_what_serving_imports():
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    extras = project["optional-dependencies"]
    assert names(project["dependencies"]) <= {"numpy", "pillow"}
    assert names(extras["serve"]) == {"onnxruntime", "numpy", "pillow"}
    assert names(extras["serve-gpu"]) == {"onnxruntime-gpu", "numpy", "pillow"}
    # Every module the train extra provides is one the subprocess tests above block.
    modules = {"open_clip_torch": "open_clip"}
    assert {modules.get(n, n) for n in names(extras["train"])} <= set(BLOCKED)
    # onnxruntime and onnxruntime-gpu are one module: no extra but the serve ones pulls either.
    for name, requirements in extras.items():
        if name not in ("serve", "serve-gpu"):
            assert not names(requirements) & {"onnxruntime", "onnxruntime-gpu"}, name
