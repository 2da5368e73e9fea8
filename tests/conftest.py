"""Test-wide set-up and the fixtures every test folder shares.

* Without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
* ``FASTPROMPT_REQUIRE_EXTENSION=1`` (set by ``make test``, so by CI) turns a C++ extension that
  did not build or load into a session error instead of a run where every C++ case is skipped.
* ``seed``: a fresh random seed per test, shown in the report of a failing test;
  ``FASTPROMPT_TEST_SEED=N`` replays one.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
