"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU needed: triton.compile for a
GPUTarget with the wheel's ptxas) at the block sizes the host code chooses, within the
architecture's shared memory and without register spills. A small and a large shape, every
dtype; bench/kernel_resources.py prints the full table for the issue's shape set."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, sys
from concurrent.futures import ProcessPoolExecutor
from fastprompt.kernels import offline_compile as oc

def run(job):
    launch, arch = job
    try:
        return oc.compile_launch(launch, arch)
    except Exception as exc:  # a compile error is a result to report
        return dict(kernel=launch.kernel, what=launch.what, arch=arch, error=repr(exc)[:500])

if __name__ == "__main__":
    launches = oc.all_launches([(33, 7, 20), (65536, 1000, 512)], float32_precisions=("ieee",))
    launches += [l for l in oc.all_launches([(256, 1000, 768)], float32_precisions=("tf32",))
                 if l.kernel == "clip_loss_forward" and "fp32" in l.what]
    jobs = [(l, arch) for arch in (80, 90) for l in launches]
    with ProcessPoolExecutor(2) as pool:
        print(json.dumps(list(pool.map(run, jobs))))
"""


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    errors = [f"sm_{r['arch']} {r['kernel']} {r['what']}: {r['error']}" for r in compiled
              if "error" in r]
    assert not errors, "\n".join(errors)
    kernels = {(r["arch"], r["kernel"]) for r in compiled}
    for arch in (80, 90):
        for kernel in ("clip_loss_forward", "row_norms", "grad_matmul", "grad_epilogue",
                       "pair_partials", "pair_project"):
            assert (arch, kernel) in kernels


def test_within_shared_memory_and_spill_budget(compiled):
    from fastprompt.kernels.offline_compile import problems

    bad = [f"sm_{r['arch']} {r['kernel']} {r['what']}: {'; '.join(problems(r))}"
           for r in compiled if "error" not in r and problems(r)]
    assert not bad, "\n".join(bad)


def test_products_use_tensor_cores(compiled):
    for r in compiled:
        # float32 with ieee precision runs on the FMA units by design.
        if (r["kernel"] in ("clip_loss_forward", "grad_matmul") and "error" not in r
                and "/ieee" not in r["what"]):
            assert r["tensor_cores"], f"sm_{r['arch']} {r['kernel']} {r['what']}: no mma/wgmma"
