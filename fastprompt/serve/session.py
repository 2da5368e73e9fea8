"""onnxruntime sessions as fastprompt serves with them: execution providers (CUDA only where a GPU
is really there), session options sized to the CPUs this process may use, a description of the
CPU a timing depends on, and the model path an export folder stands for."""
from __future__ import annotations

import ctypes
import logging
import os

import onnxruntime as ort

from fastprompt.serve.metadata import ModelInfo

logger = logging.getLogger("fastprompt.serve")  # the name it had as one module

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Instruction-set extensions onnxruntime's CPU kernels pick from (MLAS dispatches on them at run
# time): VNNI/AMX speed up int8 products, AVX-512 both.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_bf16", "amx_int8")


def _gpu_present() -> bool:
    """Whether the CUDA driver sees a GPU (asked through libcuda, so no torch is needed)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and a GPU is present, else CPU only.

    The GPU wheel lists the CUDA provider even on machines without a GPU and logs an error when
    asked for it there, hence the GPU check.
    """
    if CUDA in ort.get_available_providers() and _gpu_present():
        return [CUDA, CPU]
    return [CPU]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (container) CPU quota.

    onnxruntime sizes its pool from the machine's physical cores, which in a container or under
    ``taskset`` can be many more than the process gets; oversubscribed threads spin against each
    other and run several times slower.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def cpu_description() -> dict:
    """The CPU model, the ISA flags among ``ISA_FLAGS`` it has, logical CPUs on the machine and
    ``available_cpus()``: what a CPU timing depends on."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "logical_cpus": os.cpu_count(), "available_cpus": available_cpus()}


def session_options(intra_op_num_threads: int | None = None) -> ort.SessionOptions:
    """The session options fastprompt serves with: every graph optimisation, one operator-level
    pool sized to the CPUs this process may use, operators run in sequence (one pool, no
    inter-op threads competing with it), the memory arena and memory-pattern planning on (the
    input shape repeats from call to call)."""
    if intra_op_num_threads is not None and (
            isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int)
            or intra_op_num_threads < 0):
        raise ValueError(f"intra_op_num_threads: expected an int >= 0 (0 = onnxruntime's "
                         f"default), got {intra_op_num_threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = (available_cpus() if intra_op_num_threads is None
                                    else intra_op_num_threads)
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    return options


def create_session(path: str, info: ModelInfo, providers=None, *,
                   intra_op_num_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session for a fastprompt model, with the provider actually used checked.

    ``providers`` as onnxruntime takes them (names or ``(name, options)`` pairs); None picks
    ``default_providers()``. If CUDA is asked for explicitly and onnxruntime silently falls back
    to the CPU, this raises instead of running slowly. ``intra_op_num_threads``: None sizes the
    pool to ``available_cpus()``; 0 leaves it to onnxruntime.
    """
    explicit = providers is not None
    providers = list(providers) if explicit else default_providers()
    if not providers:
        raise ValueError("providers: empty list; pass None for the default")
    requested = [p if isinstance(p, str) else p[0] for p in providers]
    unknown = [p for p in requested if p not in ort.get_available_providers()]
    if unknown:
        raise ValueError(f"providers: {unknown} not available in this onnxruntime (available: "
                         f"{ort.get_available_providers()}); onnxruntime and onnxruntime-gpu "
                         "exclude each other, install one")
    options = session_options(intra_op_num_threads)
    # onnxruntime 1.32 crashes (SIGSEGV) while applying its NCHWc layout transformer to the fp16
    # Conv of a converted model on the CPU provider; the transformer only helps fp32.
    disabled = ["NchwcTransformer"] if info.precision == "float16" and CPU in requested else []
    try:
        session = ort.InferenceSession(path, options, providers=providers,
                                       disabled_optimizers=disabled or None)
    except Exception as e:  # onnxruntime raises its own exception types, with the reason inside
        raise ValueError(f"model: onnxruntime cannot load {path} (damaged file, or a graph this "
                         f"onnxruntime cannot run): {e}") from None
    used = session.get_providers()
    if explicit and requested[0] == CUDA and used[0] != CUDA:
        raise ValueError(f"providers: CUDAExecutionProvider was requested but onnxruntime runs "
                           f"{used[0]} (no GPU, or CUDA libraries missing; see onnxruntime's log)")
    logger.info("fastprompt: %s runs on %s", path, used[0])
    return session


def resolve_model_path(model: str | os.PathLike) -> str:
    """An export folder means its ``model.onnx``; a file is taken as is."""
    path = os.fspath(model)
    if os.path.isdir(path):
        path = os.path.join(path, "model.onnx")
    if not os.path.isfile(path):
        raise ValueError(f"model: {path} does not exist (expected an exported model.onnx or "
                         "the folder holding it)")
    return path
