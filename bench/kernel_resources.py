"""Every Triton kernel compiled offline for sm_80 and sm_90 at the block sizes the host code
chooses, without a GPU: registers, spills, shared memory, and whether tensor-core instructions
(mma / wgmma) were emitted, for a person reading the schedule.

    python bench/kernel_resources.py                      # the issue's shape set, both archs
    python bench/kernel_resources.py --arch 90 --shapes 256,1000,512

Uses fastprompt.kernels.offline_compile (triton.compile for a GPUTarget, the wheel's ptxas);
TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from fastprompt.kernels import offline_compile  # noqa: E402

ISSUE_SHAPES = list(itertools.product((1, 33, 256, 65536), (1, 7, 1000, 21843), (20, 512, 768, 1024)))


def _compile(job):
    launch, arch = job
    return offline_compile.compile_launch(launch, arch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--shapes", nargs="+", default=None, help="N,C,D triples (default: the issue's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else ISSUE_SHAPES)
    jobs = [(launch, arch) for arch in args.arch
            for launch in offline_compile.all_launches(shapes)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_compile, jobs))
    table = [[r["arch"], r["kernel"], r["what"], r["num_warps"], r["registers"],
              r["spill_stores"], r["spill_loads"], r["shared"], "yes" if r["tensor_cores"] else "-",
              "; ".join(offline_compile.problems(r)) or "ok"] for r in rows]
    print(common.markdown_table(["sm", "kernel", "launch", "warps", "registers", "spill st B",
                                 "spill ld B", "shared B", "tensor cores", "verdict"], table))
    return 1 if any(offline_compile.problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
