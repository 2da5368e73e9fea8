#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a session that is lent a CUDA machine
# (a fixed, short device budget: correctness first, then the issues' target points, then the
# rest). Run from the repository root on that machine:
#
#     bash bench/device_check.sh [OUTDIR] [SECONDS]      # default: $OUT (or bench/results/device), 480 s
#
# The machine's image has torch, triton, onnx and onnxruntime but no open_clip: `make
# device-wheels` here puts open_clip_torch, ftfy and wcwidth wheels (CPython 3.12, x86-64) in
# .whl/, which the run carries and installs into /tmp/site. The C++ extension is not built there
# (the CUDA path is Triton; fastprompt warns once that the CPU kernels are missing). Each step
# has its own time limit and is skipped once the budget is spent. OUTDIR gets two files (the
# device tool returns at most eight): device_check.log, the tail of every step, and
# results.tar.gz, packed after each step with every step's whole output and the result files so
# far, so that a run cut short still returns what it measured. Results land in
# bench/results/*-cuda-<device>.{json,md}: unpack them into the checkout and commit them.
#
# Both CUDA schedules of the loss ops run (FASTPROMPT_CUDA_SCHEDULE, read at every call): the op
# tests under the default (cublas; tests/ops/test_cuda_schedules.py forces each), the fused one's
# own pass over the op tests, and the loss benchmark's target points once per schedule (result
# names end in -cublas / -fused; each JSON records "cuda_schedule"). The other benchmarks run the
# default. bench/kernel_schedules.py then prints the compiled schedule (registers, spills, shared
# memory) with the device's own triton for comparison with the offline table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/device}}
budget=${2:-480}
mkdir -p "$out"
log="$out/device_check.log"
steps=$(mktemp -d /tmp/device_check.XXXXXX)
start=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# step NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of the budget), logging both.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    echo "=== $name: skipped (budget spent)" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, $((SECONDS - start))s elapsed): $*" | tee -a "$log"
  timeout "$limit" "$@" >"$steps/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$steps/$name.txt" | tee -a "$log"
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  pack
}

pack() {
  local results=(bench/results/*cuda*)
  [[ -e ${results[0]} ]] && results=(-C "$PWD" "${results[@]}") || results=()
  tar czf "$out/results.tar.gz.part" -C "$steps" . "${results[@]}" \
    && mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

step environment 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; python3 -c "import open_clip; print(\"open_clip\", open_clip.__version__)"'
# The Triton kernels on the GPU against float64 truth, bad input, torch.compile with inductor:
# the default schedule, then the fused one (test_cuda_schedules.py ran both already).
step ops_tests 240 python3 -m pytest -q -p no:cacheprovider tests/ops -k cuda --maxfail 50
# The kernels' own tests (the cuBLAS forward's chunks, split counts, launch helpers) on the GPU;
# test_compile_for_gpu compiles offline and needs none.
step kernel_tests 60 python3 -m pytest -q -p no:cacheprovider tests/kernels \
  --ignore=tests/kernels/test_compile_for_gpu.py --maxfail 50
step ops_tests_fused 150 env FASTPROMPT_CUDA_SCHEDULE=fused python3 -m pytest -q \
  -p no:cacheprovider tests/ops -k "cuda and not test_cuda_schedules" --maxfail 50
# The issue's target points under each schedule: N=256 (fp32, bf16, against eager and
# torch.compile), N=65536 bf16.
for schedule in cublas fused; do
  step "bench_loss_targets_$schedule" 120 env FASTPROMPT_CUDA_SCHEDULE=$schedule \
    python3 bench/bench_clip_cross_entropy.py --n 256 --c 1000 --d 512 \
    --name "clip_cross_entropy-targets-$schedule"
  step "bench_loss_large_$schedule" 60 env FASTPROMPT_CUDA_SCHEDULE=$schedule \
    python3 bench/bench_clip_cross_entropy.py --n 65536 --c 1000 --d 512 --dtype bfloat16 \
    --no-compile --name "clip_cross_entropy-n65536-$schedule"
done
step kernel_schedules 90 python3 bench/kernel_schedules.py --n 65536 --c 1000 --d 512 --jobs 8
# GCE/MAE in the loss op (default schedule) and the logits op on given logits (fp32, bf16).
step bench_loss_gce 120 python3 bench/bench_clip_cross_entropy.py --n 256 4096 --c 1000 \
  --d 512 --loss ce gce nlprompt --modes forward_backward --name clip_cross_entropy-gce
step bench_logits 150 python3 bench/bench_logits_cross_entropy.py --n 256 4096 65536 \
  --c 1000 --rounds 3 --min-run-time 0.2
# train --compile (CUDA graphs): the whole CoOp step at the target point, then its tests on CUDA.
step bench_train_step 200 python3 bench/bench_train_step.py --models ViT-B-16 fastprompt-tiny \
  --n 256 --classes 100 --methods coop coop+prograd --min-run-time 2
step compiled_step_tests 180 python3 -m pytest -q -p no:cacheprovider \
  tests/train/test_compiled_step.py -k "inductor or resume or one_graph"
step bench_prograd 150 python3 bench/bench_prograd.py
step bench_training 150 python3 bench/bench_training.py --models fastprompt-tiny ViT-B-32
step demo 120 python3 -m fastprompt demo
step bench_loss_grid 150 python3 bench/bench_clip_cross_entropy.py --no-compile --rounds 3 \
  --min-run-time 0.2
step bench_softcpt 120 python3 bench/bench_softcpt.py --tasks 2 4
step bench_export 90 python3 bench/bench_export.py --models fastprompt-tiny ViT-B-32

pack
echo "=== done after $((SECONDS - start))s: $out/results.tar.gz" | tee -a "$log"
