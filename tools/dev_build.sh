#!/usr/bin/env bash
# Developer build: compile nbretr._C with CMake and copy it into ./src/nbretr, so that
# `PYTHONPATH=src pytest` tests this working tree without `pip install`.
#   tools/dev_build.sh                 NBRETR_CUDA=auto: CUDA kernels when nvcc, a CUDA
#                                      torch and a visible GPU are all present
#   NBRETR_CUDA=1 tools/dev_build.sh   CPU + CUDA kernels (fails without nvcc / CUDA torch)
#   NBRETR_CUDA=0 tools/dev_build.sh   CPU kernels only (fast; NBRETR_CPU_ONLY=1 also works)
# PYTHON selects the interpreter (default: python3 on PATH); CMAKE_ARGS adds CMake options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${NBRETR_CUDA:-auto}
[ "${NBRETR_CPU_ONLY:-0}" = "1" ] && [ -z "${NBRETR_CUDA:-}" ] && mode=0
export NBRETR_CUDA=$mode
tag=$([ "$mode" = "0" ] && echo cpu || echo full)
cmake -S . -B "build/dev-$tag" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBRETR_INPLACE=ON \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" ${CMAKE_ARGS:-} >/dev/null
cmake --build "build/dev-$tag" -j "${NBRETR_BUILD_JOBS:-2}"
