#!/usr/bin/env bash
# Developer build: compile nbretr._C with CMake and copy it into ./src/nbretr, so that
# `PYTHONPATH=src pytest` tests this working tree without `pip install`.
#   tools/dev_build.sh            CPU + CUDA kernels (when nvcc and CUDA torch exist)
#   NBRETR_CPU_ONLY=1 tools/dev_build.sh   CPU kernels only (fast)
# PYTHON selects the interpreter (default: python3 on PATH); CMAKE_ARGS adds CMake options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tag=$([ "${NBRETR_CPU_ONLY:-0}" = "1" ] && echo cpu || echo full)
cmake -S . -B "build/dev-$tag" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBRETR_INPLACE=ON \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" ${CMAKE_ARGS:-} >/dev/null
cmake --build "build/dev-$tag" -j "${NBRETR_BUILD_JOBS:-2}"
