#!/usr/bin/env bash
# The GPU half of the speed benchmark, for one NVIDIA H100/H200:
#   bash lab/benchmarks/run_gpu.sh            # everything below in order, stopping cleanly before 570 s
#   bash lab/benchmarks/run_gpu.sh eager      # the test suite on CUDA, then the eager table (~4 min)
#   bash lab/benchmarks/run_gpu.sh compile    # compiled table (ResNet-50), inductor's kernels, profiler (~6 min)
# (times estimated from the 0.1.1 H200 runs, not yet measured for this version). Each step is cut off at the
# deadline; what finished is in $OUT (default results/benchmarks): gpu_tests.log, bench_cuda_eager.*,
# bench_cuda_compile.*, inductor_cuda.md, profile_cuda.md. Needs torch with CUDA, timm, safetensors and
# huggingface_hub; run from anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/benchmarks}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--device cuda --amp --amp-dtype bfloat16 --channels-last --batch-size 256 --iters 10 --out "$OUT")

step() {  # step NAME COMMAND...: run it within what is left of the deadline
  local left=$((DEADLINE - SECONDS))
  if ((left < 30)); then echo "skipped $1: deadline reached" | tee -a "$OUT/gpu_steps.log"; return; fi
  echo "== $1 (${left}s left)" | tee -a "$OUT/gpu_steps.log"
  shift
  timeout "$left" "$@"
  echo "   exit $? after ${SECONDS}s" | tee -a "$OUT/gpu_steps.log"
}

eager() {
  step layer-tests bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_fast_paths.py 2>&1 | tee '$OUT/gpu_tests.log'"
  step eager-table python -m lab.benchmarks.bench_attention "${common[@]}" --name bench_cuda_eager
}

compiled() {
  step compiled-table python -m lab.benchmarks.bench_attention "${common[@]}" --compile --families resnet50 \
    --variants SE "NAM (ours)" --name bench_cuda_compile
  step inductor-kernels python -m lab.benchmarks.inductor_kernels --device cuda --batch-size 64 --out "$OUT"
  step profiler python -m lab.benchmarks.profile_gate --device cuda --amp --channels-last --batch-size 256 --out "$OUT"
}

case "${1:-all}" in
  all) eager; compiled ;;
  eager) eager ;;
  compile) compiled ;;
  *) echo "usage: bash lab/benchmarks/run_gpu.sh [all|eager|compile]" >&2; exit 2 ;;
esac
