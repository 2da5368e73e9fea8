"""Test-wide set-up and the fixtures every test folder shares.

* Without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
* ``FASTPROMPT_REQUIRE_EXTENSION=1`` (set by ``make test``, so by CI) turns a C++ extension that
  did not build or load into a session error instead of a run where every C++ case is skipped.
* ``seed``: a fresh random seed per test, shown in the report of a failing test;
  ``FASTPROMPT_TEST_SEED=N`` replays one.
* ``tiny_clip``, ``tiny_text``, ``tiny_weights``: the tiny open_clip model (its seeded default
  weights), and those weights saved as a checkpoint file (so runs can name ``--pretrained``).
* ``tiny``, ``class_embeddings``, ``tiny_export``, ``image_files``: one float32 ONNX export of the
  tiny model and images to classify, shared by tests/export and tests/serve (their helpers are
  in tests/onnxlib.py).
"""
import os
import tempfile

import numpy as np
import pytest
import torch

from onnxlib import CLASS_NAMES, METHOD, SCALE, random_image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fastprompt's own memo files (weights hashes) go to a throw-away folder, not ~/.cache.
os.environ.setdefault("FASTPROMPT_CACHE_DIR", tempfile.mkdtemp(prefix="fastprompt-test-cache-"))


def pytest_sessionstart(session):
    if os.environ.get("FASTPROMPT_REQUIRE_EXTENSION", "0") == "1":
        from fastprompt import _backend
        if not _backend.cpp_available():
            raise pytest.UsageError(
                "FASTPROMPT_REQUIRE_EXTENSION=1, but the C++ extension fastprompt._C did not load "
                f"({_backend.cpp_error()}); rebuild it with `make build`")


def _draw_seed() -> int:
    forced = os.environ.get("FASTPROMPT_TEST_SEED")
    return int(forced) if forced else int.from_bytes(os.urandom(4), "little")


_session_seed: int | None = None


@pytest.fixture
def seed(request):
    """A seed drawn for this test run (``FASTPROMPT_TEST_SEED`` replays a given one)."""
    value = _draw_seed()
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture(scope="session")
def session_seed():
    """One seed for the session's shared random data (generated images); every failure report
    shows it once it has been drawn."""
    global _session_seed
    _session_seed = _draw_seed()
    return _session_seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "seed"]
        for value in seeds:
            report.sections.append(
                ("seed", f"seed {value}: replay with FASTPROMPT_TEST_SEED={value}"))
        if _session_seed is not None and _session_seed not in seeds:
            report.sections.append(
                ("session seed", f"session seed {_session_seed} (shared generated data): replay "
                 f"with FASTPROMPT_TEST_SEED={_session_seed}"))
    return report


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess_train, preprocess_val, tokenizer) of fastprompt-tiny (64x64 images,
    embed_dim 64; weights: the fixed seeded draw). Shared: tests must not modify the model."""
    from fastprompt.models import TINY_MODEL, create_model
    return create_model(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_text(tiny_clip):
    """(model, tokenizer) of ``tiny_clip``."""
    return tiny_clip[0], tiny_clip[3]


@pytest.fixture(scope="session")
def tiny_weights(tiny_clip, tmp_path_factory):
    """Path of a .safetensors checkpoint holding ``tiny_clip``'s weights."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip[0].state_dict().items()}, str(path))
    return str(path)


# ----- exported classifiers (tests/export, tests/serve) -------------------------------------------


@pytest.fixture(scope="session")
def tiny(tiny_clip):
    """(model, preprocess_val) of ``tiny_clip``."""
    return tiny_clip[0], tiny_clip[2]


@pytest.fixture(scope="session")
def class_embeddings():
    """Unnormalised C x 64 text features (rows of different norms, as a text tower gives)."""
    g = torch.Generator().manual_seed(1234)
    t = torch.randn(len(CLASS_NAMES), 64, generator=g)
    return t * torch.linspace(0.3, 5.0, len(CLASS_NAMES))[:, None]


@pytest.fixture(scope="session")
def tiny_export(tiny, class_embeddings, tmp_path_factory):
    """An fp32 export of the tiny model; ``(out_dir, report)``. Tests must not modify it."""
    from fastprompt.export import TritonSettings, export_onnx  # loads onnx: only when asked for
    out = tmp_path_factory.mktemp("tiny_export")
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, out, scale=SCALE,
                         model_name="fastprompt-tiny", method=METHOD,
                         triton=TritonSettings(name="tiny_clf"))
    return out, report


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, session_seed):
    """Five images of odd sizes and modes (RGB, grayscale, RGBA, palette), as PNG and JPEG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(session_seed)
    paths = []
    for i, (size, mode, ext) in enumerate([((50, 80), "RGB", "png"), ((97, 31), "L", "png"),
                                           ((64, 64), "RGBA", "png"), ((120, 90), "RGB", "jpg"),
                                           ((33, 65), "P", "png")]):
        paths.append(folder / f"img{i}.{ext}")
        random_image(rng, *size, mode).save(paths[-1])
    return paths
