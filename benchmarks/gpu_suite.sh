#!/usr/bin/env bash
# One device call: install, build the CUDA extension, run the GPU tests and both benchmarks, and
# write a short table plus logs under $OUT (default ./gpu-out). Stage limits add up to 8 minutes;
# results.md is written whenever the script ends, so a stopped run still reports what it measured
# (bench ops writes its CSV and plot row by row; tests.log names the slowest tests).
#   FASTFORGET_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTFORGET_CACHE=/tmp/fastforget-cache
export FASTFORGET_COMMIT=${FASTFORGET_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
build_rc=- tests_rc=- ops_rc=- step_rc=-
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/suite.log"; }

summary() {
  {
    echo "# fastforget GPU suite"
    echo "date: $(date -u +%F) · commit: $FASTFORGET_COMMIT · $(tail -1 "$OUT/gpu.txt" 2>/dev/null)"
    echo "build rc=$build_rc · gpu tests rc=$tests_rc ($(tail -1 "$OUT/tests.log" 2>/dev/null)) · ops rc=$ops_rc · step rc=$step_rc"
    echo
    echo '```'
    grep -hv "^W1" "$OUT/step.log" "$OUT/ops.log" 2>/dev/null
    echo '```'
  } >"$OUT/results.md"
  cat "$OUT/results.md"
}
trap summary EXIT

step "install"
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/suite.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/suite.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1

step "build the CUDA extension (ptxas report in build.log)"
FASTFORGET_VERBOSE_BUILD=1 timeout 90 $PY -c "from fastforget import native; print(native.load('cuda'))" >"$OUT/build.log" 2>&1
build_rc=$?
$PY -m fastforget.cli info | tee "$OUT/info.txt"

step "GPU tests"
timeout 170 $PY -m pytest -q -ra --durations=15 -m gpu tests/ >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

step "bench step (mae_vit_large_patch16, 224px, mask 0.75, batch 128)"
timeout 100 $PY -m fastforget.cli bench step --model mae_vit_large_patch16 --batch-size 128 --device cuda \
  --min-time 1 --csv "$OUT/step.csv" >"$OUT/step.log" 2>&1
step_rc=$?

step "bench ops (every op, MAE/MAGE shapes, against the roofline)"
timeout 120 $PY -m fastforget.cli bench ops --device cuda --reps 20 --csv "$OUT/ops.csv" >"$OUT/ops.log" 2>&1
ops_rc=$?
