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

step "benchmarks"
csv="$OUT/bench.csv"
rm -f "$csv"
while read -r op args; do
  timeout 120 $PY -m fastforget.cli bench $op $args --device cuda --csv "$csv" 2>&1 | tee -a "$OUT/bench.log"
done <<'LIST'
loss --shape 256 50 1024 --dtype bfloat16
loss --shape 256 50 1024 --dtype float32
loss --shape 4096 256 1024 --dtype bfloat16
patch --batch-size 256 --dim 1024 --dtype bfloat16
patch --batch-size 256 --dim 1024 --dtype float32
teacher --batch-size 256 --dtype float32
teacher --batch-size 1024 --dtype float32
LIST

{
  echo "# fastforget GPU suite"
  echo "date: $(date -u +%F) · commit: $commit · $(head -2 "$OUT/gpu.txt" | tail -1)"
  echo "build: rc=$build_rc · gpu tests: rc=$tests_rc, $(tail -1 "$OUT/tests.log")"
  echo
  echo '```'
  grep -v "^W1" "$OUT/bench.log"
  echo '```'
} >"$OUT/results.md"
cat "$OUT/results.md"
