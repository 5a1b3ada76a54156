#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on an H100/H200 (Python 3.12, torch 2.11,
# no package index): build the extension from source, run the CUDA tests, run
# compute-sanitizer (memcheck, racecheck) on the CUDA op tests, time every benchmark,
# write JSON into the folder given as the argument, print a short table last.
#   usage: bench/gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
step() { echo "=== $* ($(date +%T))"; }

step "build"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if ! PYTHON=$PY NBRETR_BUILD_JOBS=16 tools/dev_build.sh > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import nbretr, json; print(json.dumps(nbretr.build_info()))" | tee "$OUT/build_info.json"

step "CUDA tests"
NBRETR_REQUIRE_EXT=1 timeout 240 $PY -m pytest -q -m needs_cuda -p no:cacheprovider tests \
  --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1 || status=1
tail -5 "$OUT/cuda_tests.log"

OP_TESTS="tests/test_ring.py tests/test_sinkhorn.py tests/test_wti.py tests/test_topk.py"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all \
      $PY -m pytest -q -x -m needs_cuda -p no:cacheprovider $OP_TESTS > "$OUT/sanitizer_$tool.log" 2>&1 \
      || { status=1; echo "$tool: FAILED (see sanitizer_$tool.log)"; }
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
  done
else
  echo "compute-sanitizer not found"; status=1
fi

step "benchmarks"
# per script: "path|timeout seconds|extra arguments"
for spec in "bench/memory_bank.py|150|" \
            "bench/sinkhorn.py|120|" \
            "bench/wti_similarity.py|120|" \
            "bench/data.py|60|" \
            "bench/topk_centrality.py|180|--sizes 50000,200000 --time-cap 100" \
            "bench/train_step.py|150|--size vitb32 --batch 128 --repeats 3"; do
  IFS='|' read -r b limit extra <<< "$spec"
  # shellcheck disable=SC2086
  timeout "$limit" $PY "$b" --out "$OUT" $extra > "$OUT/$(basename "$b" .py).txt" 2>&1 \
    || { status=1; echo "$b FAILED"; }
done

step "summary"
cat "$OUT"/*.txt 2>/dev/null | grep -v "^USDT" | tail -60
$PY bench/summarize.py "$OUT"
exit $status
