"""Shared benchmark plumbing: environment record, timing, peak memory, result files.

Timing: warm up, then the median of many runs; device events (``triton.testing.do_bench``) on
CUDA, ``torch.utils.benchmark`` on CPU with the run's thread count. Ratios are only ever taken
between providers timed in the same process, interleaved in rounds so that load drifting on a
shared machine hits them alike.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from fastprompt._io import write_text_atomic

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """Device name and library versions, recorded beside every result."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        from fastprompt.kernels.schedule_choice import schedule
        env["cuda"] = torch.version.cuda
        env["cuda_schedule"] = schedule()  # FASTPROMPT_CUDA_SCHEDULE: which loss kernels ran
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def time_ms(fn, device: torch.device, min_run_time: float = 1.0) -> dict:
    """Median (and inter-quartile range) of ``fn()`` in milliseconds, after a warm-up call. On
    CPU with the run's thread count: ``torch.utils.benchmark.Timer`` would use ONE thread."""
    if device.type == "cuda":
        from triton.testing import do_bench
        fn()
        torch.cuda.synchronize()
        q25, median, q75 = do_bench(fn, quantiles=[0.25, 0.5, 0.75], rep=int(min_run_time * 1000))
        return {"median_ms": median, "iqr_ms": q75 - q25, "runs": None}
    from torch.utils import benchmark
    fn()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                        ).blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times)}


def interleaved_times(steps: dict, device: torch.device, min_run_time: float,
                      rounds: int = 5) -> dict:
    """``{name: {median_ms, iqr_ms, runs, round_medians_ms}}``: each step warmed up, then timed
    in ``rounds`` interleaved rounds; the median of the rounds' medians."""
    per_round = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up (and compilation)
    for _ in range(rounds):
        for name, step in steps.items():
            per_round[name].append(time_ms(step, device, min_run_time / rounds))
    out = {}
    for name, results in per_round.items():
        medians = sorted(r["median_ms"] for r in results)
        out[name] = {"median_ms": medians[len(medians) // 2],
                     "iqr_ms": medians[(3 * len(medians)) // 4] - medians[len(medians) // 4],
                     "runs": sum(r["runs"] or 0 for r in results), "round_medians_ms": medians}
    return out


_malloc_fixed = False


def _fix_malloc() -> None:
    """Make glibc return large blocks with mmap/munmap, so the resident high-water mark sees
    every large temporary instead of reusing a heap that already grew (without this, a
    provider measured second looks free)."""
    global _malloc_fixed
    if not _malloc_fixed:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        _malloc_fixed = True


def _resident_high_water() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _resident() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak memory ``fn()`` allocates above what was live before it.

    CUDA: the caching allocator's peak. CPU: the process's resident high-water mark, reset
    through ``/proc/self/clear_refs`` (Linux), minus the resident size before the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    _fix_malloc()
    fn()  # warm: first-call allocations (thread pools, caches) are not the op's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _resident()
    fn()
    return max(_resident_high_water() - base, 0)


def write_results(name: str, env: dict, rows: list[dict], table: str) -> str:
    """Write ``bench/results/<name>-<device>.json`` and ``.md`` atomically; return the JSON path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tag = "cuda-" + env["device"].replace(" ", "_") if env["device_type"] == "cuda" else "cpu"
    base = os.path.join(RESULTS_DIR, f"{name}-{tag}")
    for path, text in ((base + ".json", json.dumps({"environment": env, "results": rows}, indent=1)),
                       (base + ".md", table)):
        write_text_atomic(path, text + "\n")
    return base + ".json"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
