#!/usr/bin/env bash
# One device call (~7 min on an H200) that checks and measures what issue 7 still needs:
#   1. the GPU tests of the editors, the fused kernels included (tests/test_editor_kernels.py);
#   2. one traced b8 step of floor and MRT, split into phases (benchmarks/trace_phases.py);
#   3. generation with the operator path and with the fused kernels (MRT_FUSED_KERNELS=1), side by side;
#   4. the training step, floor and MRT in turn (--cycles 3; LoRA arms: add them to --arms).
# Usage (repository root, a CUDA machine; OUT defaults to ./gpu_out):
#   OUT=/some/dir bash benchmarks/gpu_validate.sh [--baseline-editors DIR]
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
if [[ "${1:-}" == "--baseline-editors" && -n "${2:-}" ]]; then
  BASELINE=(--baseline-editors "$2")
  TRAIN_ARMS+=(mrt_before)
fi
failed=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, count failures
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed=$((failed + 1)); fi
  tail -n 3 "$OUT/$name.log"
}
step gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_editor_kernels.py tests/test_editors_gpu.py \
  tests/test_editors_speed.py
step trace python3 benchmarks/gpu_train_step.py --batch-sizes 8 --arms floor mrt --warmup 2 --steps 4 \
  --profile-steps 1 --trace --profile "$OUT/prof" --json "$OUT/trace_step.json"
step phases python3 benchmarks/trace_phases.py "$OUT/prof/trace_floor_b8.json.gz" "$OUT/prof/trace_mrt_b8.json.gz"
step generate python3 benchmarks/gpu_generate.py "${BASELINE[@]}" --split --rounds 15 \
  --json "$OUT/generate.json" --markdown "$OUT/generate.md"
step generate_fused python3 benchmarks/gpu_generate.py --fused-kernels --split --rounds 15 \
  --json "$OUT/generate_fused.json" --markdown "$OUT/generate_fused.md"
step train python3 benchmarks/gpu_train_step.py "${BASELINE[@]}" --cycles 3 --warmup 2 --steps 8 \
  --arms "${TRAIN_ARMS[@]}" --json "$OUT/train.json" --markdown "$OUT/train.md"
echo "failed steps: $failed"
exit "$failed"
