// Default tiles of the top-k engines: query rows per chunk and gallery columns per tile.
// The CPU engine (csrc/cpu/topk_engine.h) and the CUDA engine (csrc/cuda/topk_engine.cuh)
// start from these; nbretr._C.topk_tiles reports them, so that bench/topk_centrality.py
// times its bare matrix product on the same tiles.
#pragma once
#include <cstdint>

namespace nbretr {

constexpr int64_t kTopkCpuQChunk = 1024;   // (their candidate reservoirs stay live)
constexpr int64_t kTopkCpuGTile = 2048;
constexpr int64_t kTopkCudaQChunk = 2048;
constexpr int64_t kTopkCudaGTile = 32768;

}  // namespace nbretr
