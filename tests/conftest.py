"""Test-wide set-up and the fixtures every test folder shares.

* Without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
* ``FASTPROMPT_REQUIRE_EXTENSION=1`` (set by ``make test``, so by CI) turns a C++ extension that
  did not build or load into a session error instead of a run where every C++ case is skipped.
* ``seed``: a fresh random seed per test, shown in the report of a failing test;
  ``FASTPROMPT_TEST_SEED=N`` replays one.
* ``tiny_clip``, ``tiny_text``, ``tiny_weights``: the tiny open_clip model (its seeded default
  weights), and those weights saved as a checkpoint file (so runs can name ``--pretrained``).
"""
import os
import tempfile

import pytest
import torch

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


@pytest.fixture
def seed(request):
    """A seed drawn for this test run (``FASTPROMPT_TEST_SEED`` replays a given one)."""
    forced = os.environ.get("FASTPROMPT_TEST_SEED")
    value = int(forced) if forced else int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(
                    ("seed", f"seed {value}: replay with FASTPROMPT_TEST_SEED={value}"))
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
