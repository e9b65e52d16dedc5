#!/usr/bin/env bash
# One device call: install, build the CUDA extension, run the GPU tests and both benchmarks, and
# leave six files in $OUT (default ./gpu-out; the device tool brings back at most eight):
# results.md (the tables, the fastforget step's top GPU ops, the tests' summary), step.csv/.png,
# ops.csv/.png and logs.tar.gz (every log, ptxas's report, each provider's profile and trace).
# Stage limits add up to 9.7 minutes (90 + 120 + 25 + 90 + 75 + 75 + 85 + 20 s); results.md is written
# however the script ends, so a stopped run still reports what it measured (bench ops writes its
# CSV and plot row by row, the attention rows last).
#   FASTFORGET_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/fastforget-suite.XXXXXX")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTFORGET_CACHE=/tmp/fastforget-cache
export FASTFORGET_COMMIT=${FASTFORGET_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
build_rc=- tests_rc=- timing_rc=- ops_rc=- step_rc=- palette_rc=- mage_rc=- data_rc=-
step() { echo "== $1 ($(date +%T))" | tee -a "$LOGS/suite.log"; }

summary() {
  {
    echo "# fastforget GPU suite"
    echo "date: $(date -u +%F) · commit: $FASTFORGET_COMMIT · $(tail -1 "$LOGS/gpu.txt" 2>/dev/null)"
    echo "build rc=$build_rc · gpu tests rc=$tests_rc, timing tests rc=$timing_rc · step rc=$step_rc," \
      "palette step rc=$palette_rc · mage step rc=$mage_rc · ops rc=$ops_rc · data rc=$data_rc"
    echo
    echo '```'
    grep -hv "^W1" "$LOGS/step.log" 2>/dev/null
    echo
    head -40 "$LOGS/profile/fastforget.txt" 2>/dev/null
    echo
    grep -hv "^W1" "$LOGS/palette.log" 2>/dev/null
    echo
    head -40 "$LOGS/profile-palette/fastforget.txt" 2>/dev/null
    echo
    grep -hv "^W1" "$LOGS/mage.log" 2>/dev/null
    echo
    head -40 "$LOGS/profile-mage/fastforget.txt" 2>/dev/null
    echo
    grep -hv "^W1" "$LOGS/ops.log" 2>/dev/null
    echo
    cat "$LOGS/data.log" 2>/dev/null
    echo
    tail -40 "$LOGS/tests.log" 2>/dev/null
    tail -5 "$LOGS/timing.log" 2>/dev/null
    echo '```'
  } >"$OUT/results.md"
  cat "$OUT/results.md"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}
trap summary EXIT

step "install"
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOGS/suite.log" 2>&1 || { echo "install failed"; tail -20 "$LOGS/suite.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$LOGS/gpu.txt" 2>&1

step "build the CUDA extension (ptxas report in build.log)"
FASTFORGET_VERBOSE_BUILD=1 timeout 90 $PY -c "from fastforget import native; print(native.load('cuda'))" >"$LOGS/build.log" 2>&1
build_rc=$?
# a build stopped by its limit leaves torch's build lock, on which every later load would wait
[ "$build_rc" = 124 ] && rm -f "$FASTFORGET_CACHE"/*/lock
$PY -m fastforget.cli info | tee "$LOGS/info.txt"

step "GPU tests (4 processes when pytest-xdist is there), then the timing tests alone"
parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 120 $PY -m pytest -q -ra --durations=15 $parallel -m "gpu and not timing" tests/ >"$LOGS/tests.log" 2>&1
tests_rc=$?
tail -3 "$LOGS/tests.log"
timeout 25 $PY -m pytest -q -ra -m "gpu and timing" tests/ >"$LOGS/timing.log" 2>&1
timing_rc=$?

step "bench step (mae_vit_large_patch16, 224px, mask 0.75, batch 128), then each provider profiled"
timeout 90 $PY -m fastforget.cli bench step --model mae_vit_large_patch16 --batch-size 128 --device cuda \
  --min-time 1 --csv "$OUT/step.csv" --profile "$LOGS/profile" >"$LOGS/step.log" 2>&1
step_rc=$?

step "bench step (palette_places2, 256px, batch 12: the issue's goals 2.5x reference, 1.3x pytorch)"
timeout 75 $PY -m fastforget.cli bench step --model palette_places2 --batch-size 12 --device cuda \
  --min-time 1 --csv "$OUT/step.csv" --profile "$LOGS/profile-palette" >"$LOGS/palette.log" 2>&1
palette_rc=$?

step "bench step (mage_vit_base_patch16, 256px, batch 64: the issue's goals 2.5x reference, 1.3x pytorch)"
timeout 75 $PY -m fastforget.cli bench step --model mage_vit_base_patch16 --batch-size 64 --device cuda \
  --min-time 1 --csv "$OUT/step.csv" --profile "$LOGS/profile-mage" >"$LOGS/mage.log" 2>&1
mage_rc=$?

step "bench ops (every op, MAE/MAGE/Palette shapes, against the roofline)"
timeout 85 $PY -m fastforget.cli bench ops --device cuda --reps 20 --csv "$OUT/ops.csv" >"$LOGS/ops.log" 2>&1
ops_rc=$?

step "bench data (256 generated 500x375 JPEGs to 256², the host's decoding rate per worker: README's worker counts)"
timeout 20 bash -c "$PY benchmarks/jpegs.py $LOGS/jpegs && $PY -m fastforget.cli bench data --data $LOGS/jpegs \
  --size 256 --workers 1,4,8,12 --images 768" >"$LOGS/data.log" 2>&1
data_rc=$?
