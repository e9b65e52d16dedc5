#!/usr/bin/env bash
# One device call: install, build the CUDA extension, run the GPU tests and the benchmarks, and
# write a short table plus logs under $OUT (default ./gpu-out). Budget: under 8 minutes on an H200.
#   FASTFORGET_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTFORGET_CACHE=/tmp/fastforget-cache
PY=${PYTHON:-python3}
commit=${FASTFORGET_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/suite.log"; }

step "install"
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/suite.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/suite.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1

step "build CUDA extension (ptxas report in build.log)"
FASTFORGET_VERBOSE_BUILD=1 timeout 300 $PY -c "from fastforget import native; print(native.load('cuda'))" >"$OUT/build.log" 2>&1
build_rc=$?
$PY -m fastforget.cli info | tee "$OUT/info.txt"

step "GPU tests"
timeout 240 $PY -m pytest -q -ra -m gpu tests/ >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

step "bench ops (every op, MAE/MAGE shapes, against the roofline)"
timeout 270 $PY -m fastforget.cli bench ops --device cuda --csv "$OUT/ops.csv" >"$OUT/ops.log" 2>&1
ops_rc=$?
step "bench step (mae_vit_large_patch16, 224px, mask 0.75, batch 128)"
timeout 150 $PY -m fastforget.cli bench step --model mae_vit_large_patch16 --batch-size 128 --device cuda \
  --min-time 1 --csv "$OUT/step.csv" >"$OUT/step.log" 2>&1
step_rc=$?

{
  echo "# fastforget GPU suite"
  echo "date: $(date -u +%F) · commit: $commit · $(head -2 "$OUT/gpu.txt" | tail -1)"
  echo "build: rc=$build_rc · gpu tests: rc=$tests_rc, $(tail -1 "$OUT/tests.log") · ops rc=$ops_rc · step rc=$step_rc"
  echo
  echo '```'
  grep -v "^W1" "$OUT/step.log"
  echo
  grep -v "^W1" "$OUT/ops.log"
  echo '```'
} >"$OUT/results.md"
cat "$OUT/results.md"
