"""Every Triton kernel compiled for real GPUs (sm_80 and sm_90) without one, with the ptxas of
the triton wheel, at the configurations the host code launches for N in {1, 33, 256, 65536},
C in {1, 7, 1000, 21843}, D in {20, 512, 768, 1024}, float32 (IEEE and TF32), bfloat16 and
float16, both CUDA schedules, both loss ops and the projection, plus the GCE/MAE variants and the
logits ops at one representative shape each: ``bench/kernel_schedules.py --grid ci`` (its
docstring has the matrix and which launches share one compile; the script also prints the table
for a person).

The compiles run in a subprocess: the interpreter that tests/conftest.py turns on for the whole
process replaces compilation."""
from __future__ import annotations

import importlib
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "bench", "kernel_schedules.py")

# Spill budget per kernel, bytes of spill stores (ptxas -v's count). A few registers spilled
# around a loop's edges cost a handful of L1-resident accesses per tile, noise next to the tile's
# own loads; beyond that a tile no longer fits the register file and its block sizes should
# shrink. Today's kernels spill nothing.
SPILL_STORE_BUDGET = 64


@pytest.fixture(scope="module")
def compiled():
    """The rows of bench/kernel_schedules.py --grid (one per distinct compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kernel_schedules-{os.getpid()}.json")
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, SCRIPT, "--grid", "ci", "--jobs", jobs, "--json", out],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result["rows"]


def test_every_kernel_compiles(compiled):
    errors = [f"sm_{r['arch']} {r['kernel']} {r['config']} (for {r['used_by'][0]}): {r['error']}"
              for r in compiled if r["error"]]
    assert not errors, "\n".join(errors)


def test_shared_memory_within_the_arch_limit(compiled):
    over = [f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['shared']} > {r['shared_limit']} B"
            for r in compiled if not r["error"] and r["shared"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_register_spills_within_budget(compiled):
    over = [f"sm_{r['arch']} {r['kernel']} {r['config']}: {r['spill_stores']} B spill stores, "
            f"{r['registers']} registers" for r in compiled
            if not r["error"] and r["spill_stores"] > SPILL_STORE_BUDGET]
    assert not over, "\n".join(over)


def test_every_kernel_and_target_is_covered(compiled):
    # A kernel added to fastprompt/kernels without a launch in the grid fails here.
    import fastprompt.kernels as package
    from triton.runtime.jit import JITFunction

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fastprompt.kernels.{info.name}")
        kernels |= {name for name, value in vars(module).items()
                    if isinstance(value, JITFunction) and name.endswith("_kernel")}
    for arch in (80, 90):
        seen = {r["kernel"] for r in compiled if r["arch"] == arch}
        assert kernels <= seen, f"sm_{arch}: never compiled: {sorted(kernels - seen)}"
    labels = {label for r in compiled for label in r["used_by"]}
    for schedule, op, dtype, n, c, d in itertools.product(
            ("cublas", "fused"), ("clip", "prograd"), ("float32-ieee", "bfloat16"),
            (1, 33, 256, 65536), (1, 7, 1000, 21843), (20, 512, 768, 1024)):
        assert f"{schedule} {op} N={n} C={c} D={d} {dtype}" in labels
    for schedule, op, dtype in itertools.product(("cublas", "fused"), ("clip", "prograd"),
                                                 ("float32-tf32", "float16")):
        assert f"{schedule} {op} N=65536 C=21843 D=1024 {dtype}" in labels


def test_fused_schedule_split_paths_are_compiled(compiled):
    # The fused forward's passes (0: whole rows, large N; 1-3: class ranges and their merge, small
    # N) and the products with their reduction over N split into slices (large N) are launched
    # by the host code somewhere in the matrix, and compiled for both architectures.
    for arch in (80, 90):
        forward = [r for r in compiled
                   if r["arch"] == arch and r["kernel"] == "clip_loss_forward_kernel"]
        passes = {int(re.search(r"\bPASS=(\d)", r["config"]).group(1)) for r in forward}
        assert passes == {0, 1, 2, 3}, f"sm_{arch}: forward passes compiled: {sorted(passes)}"
        assert max(r["grid_y"] for r in forward) > 1
        products = [r for r in compiled
                    if r["arch"] == arch and r["kernel"] == "_grad_matmul_kernel"]
        assert any(r["grid_y"] > 1 for r in products), f"sm_{arch}: no split over N compiled"


def test_robust_loss_and_logits_variants_are_compiled(compiled):
    # GCE (one exponent, and one per row) in every pass of the fused forward and in the cuBLAS
    # schedule's row pass, and the logits ops' launches of the row kernel (scale 1, the logits
    # read in their dtype), for both architectures.
    for arch in (80, 90):
        forward = [r for r in compiled
                   if r["arch"] == arch and r["kernel"] == "clip_loss_forward_kernel"]
        gce = [r for r in forward if "GCE=True" in r["config"]]
        passes = {int(re.search(r"\bPASS=(\d)", r["config"]).group(1)) for r in gce}
        assert passes == {0, 1, 2, 3}, f"sm_{arch}: GCE passes compiled: {sorted(passes)}"
        assert any("Q_PER_ROW=True" in r["config"] for r in gce)
        assert any("DOUBLE_SOFTMAX=False" in r["config"] for r in gce)
        assert any("PRODUCTS_STORED=True" in r["config"] and "SCALED=True" in r["config"]
                   for r in gce)
        logits = [r for r in forward if "SCALED=False" in r["config"]]
        for option in ("GCE=True", "GCE=False", "HAS_KL=True", "HAS_KL=False"):
            assert any(option in r["config"] for r in logits), f"sm_{arch}: logits {option}"
    # bench/kernel_schedules.py's LOSS_SCENARIOS (not imported: it refuses the interpreter that
    # this process runs under).
    labels = {label for r in compiled for label in r["used_by"]}
    for wanted in ("fused clip N=256 C=1000 D=512 bfloat16 loss=gce-rows",
                   "fused prograd N=256 C=1000 D=512 bfloat16 loss=gce-rows",
                   "cublas clip N=4096 C=1000 D=512 bfloat16 loss=gce-rows",
                   "- logits N=4096 C=1000 D=0 bfloat16 loss=gce-rows",
                   "- logits-prograd N=4096 C=1000 D=0 bfloat16 loss=gce"):
        assert wanted in labels, wanted
