#!/usr/bin/env bash
# One device call (~7 min on an H200) that checks and measures what issue 7 still needs:
#   1. the GPU tests of the editors, the fused kernels included (tests/test_editor_kernels.py);
#   2. the host time of each call an edit site is made of (benchmarks/gpu_host_overhead.py);
#   3. generation: base, MRT on the operator path and MRT with the fused kernels (the default) in the
#      same 30 rounds (prompt pass, 8 decode steps, whole generate()), then one profiled generate();
#   4. the training step, floor and MRT in turn (--cycles 3; LoRA arms: add them to --arms);
#   with --tune first: launch configurations of the training backward kernels (gpu_kernel_tuning.py);
#   with --trace: one traced b8 step of floor and MRT, split into phases (trace_phases.py);
#   with --decompose: what the b8 step's editors cost, split: arms floor, mrt, mrt_vision, mrt_lm,
#   mrt_nolaunch at the 7B shape, then the same arms at tiny widths (--host-bound: host time only)
#   with cProfile tables of each arm;
#   with --graphs: the training step also as floor_graphed / mrt_graphed (the vision layers as CUDA
#   graphs, train.cuda_graphs) and generation also as base_graphed / mrt_graphed (gpu_generate --graphs).
# Usage (repository root, a CUDA machine; OUT defaults to ./gpu_out):
#   OUT=/some/dir bash benchmarks/gpu_validate.sh [--tune] [--trace] [--decompose] [--graphs] [--no-train] [--no-generate] [--baseline-editors DIR]
# On the lent H200 (no network, no pydantic): carry .whl/ and first
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
# Every step writes its JSON/markdown under $OUT and goes on after a failure; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
BASELINE=()
TRAIN_ARMS=(floor mrt)
TRACE=0
TRAIN=1
GENERATE=1
TUNE=0
DECOMPOSE=0
GRAPHS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --trace) TRACE=1; shift ;;
    --no-train) TRAIN=0; shift ;;
    --no-generate) GENERATE=0; shift ;;
    --tune) TUNE=1; shift ;;
    --decompose) DECOMPOSE=1; shift ;;
    --graphs) GRAPHS=(--graphs); TRAIN_ARMS+=(floor_graphed mrt_graphed); shift ;;
    --baseline-editors) BASELINE=(--baseline-editors "$2"); TRAIN_ARMS+=(mrt_before); shift 2 ;;
    *) echo "gpu_validate.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
failed=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, count failures
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed=$((failed + 1)); fi
  tail -n 3 "$OUT/$name.log"
}
step gpu_tests python3 -m pytest -q -p no:cacheprovider -s tests/test_editor_kernels.py tests/test_editors_gpu.py \
  tests/test_editors_speed.py tests/test_orthonormal_kernel.py tests/test_launch.py tests/test_editor_graphs.py
if [[ $TUNE == 1 ]]; then
  step tune python3 benchmarks/gpu_kernel_tuning.py --kernels rows_train rows_backward backward --json "$OUT/kernel_tuning.json"
fi
if [[ $TRACE == 1 ]]; then
  step trace python3 benchmarks/gpu_train_step.py --batch-sizes 8 --arms floor mrt --warmup 2 --steps 4 \
    --profile-steps 1 --trace --profile "$OUT/prof" --json "$OUT/trace_step.json"
  step phases python3 benchmarks/trace_phases.py "$OUT/prof/trace_floor_b8.json.gz" "$OUT/prof/trace_mrt_b8.json.gz"
fi
if [[ $DECOMPOSE == 1 ]]; then
  ARMS=(floor mrt mrt_vision mrt_lm mrt_nolaunch)
  step decompose python3 benchmarks/gpu_train_step.py --batch-sizes 8 --cycles 3 --warmup 2 --steps 8 \
    --arms "${ARMS[@]}" --json "$OUT/decompose.json"
  step host_bound python3 benchmarks/gpu_train_step.py --host-bound --cycles 3 --warmup 3 --steps 20 \
    --arms "${ARMS[@]}" --cprofile "$OUT/prof" --json "$OUT/host_bound.json"
fi
step host_overhead python3 benchmarks/gpu_host_overhead.py --json "$OUT/host_overhead.json"
if [[ $GENERATE == 1 ]]; then
  step generate python3 benchmarks/gpu_generate.py "${BASELINE[@]}" "${GRAPHS[@]}" --compare-kernels --rounds 30 \
    --profile "$OUT/prof" --json "$OUT/generate.json" --markdown "$OUT/generate.md"
fi
if [[ $TRAIN == 1 ]]; then
  step train python3 benchmarks/gpu_train_step.py "${BASELINE[@]}" --cycles 3 --warmup 2 --steps 8 \
    --arms "${TRAIN_ARMS[@]}" --json "$OUT/train.json" --markdown "$OUT/train.md"
fi
# the device returns at most 8 files: traces and op tables travel as one archive
if [[ -d "$OUT/prof" ]]; then tar czf "$OUT/prof.tgz" -C "$OUT" prof && rm -rf "$OUT/prof"; fi
echo "failed steps: $failed"
exit "$failed"
