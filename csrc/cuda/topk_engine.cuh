// topk_centrality on CUDA, independent of how a similarity tile is computed.
//
// The driver streams query chunks x gallery tiles. A tile function fills an fp32 tile
// [qn, gn] (row-major) on the current stream; sim="dot" passes a matrix product
// (csrc/cuda/topk_centrality.cu), sim="wti" can pass its token-wise kernel. Per tile:
//  - select: one block per tile row. The row's running top-k (global memory, sorted by the
//    tie rule of csrc/common/topk.h) is loaded into shared memory slots [0, P); the tile row
//    is scanned in rounds; values that beat the current k-th entry are appended to slots
//    [P, 2P); when any arrived, the 2P slots are bitonic-sorted best-first
//    (topk_bitonic_step) and the best k kept. P = max(256, next power of two >= k).
//    A round is P columns while the list is not full, then `wide` columns (rounds * P:
//    fewer barriers; the threshold rises once per round). A wide round with more than P
//    candidates is scanned again P columns at a time.
// After the last tile of a chunk, counts get one integer atomicAdd per (row, slot). The
// similarity sums are the caller's (sim="dot": csrc/common/topk_dot_sums.h, no tile).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common/settings.h"
#include "common/topk.h"
#include "common/topk_tiles.h"

namespace nbretr {
namespace topk_cuda {

constexpr int kSelectThreads = 256;

inline int select_slots(int64_t k) {  // P
  int p = kSelectThreads;
  while (p < k) p <<= 1;
  return p;
}

// grid.x = qn rows; dynamic shared memory 2P * (4 + 8) bytes; wide >= P.
__global__ void select_tile_kernel(const float* __restrict__ tile, int64_t qn, int64_t gn, int64_t g0,
                                   int64_t row0, bool exclude_self, int64_t q_offset, float* __restrict__ run_v,
                                   int64_t* __restrict__ run_i, int* __restrict__ run_n, int k, int P,
                                   int64_t wide) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* si = reinterpret_cast<int64_t*>(smem_raw);          // 2P indices (8-byte aligned first)
  float* sv = reinterpret_cast<float*>(si + 2 * P);           // 2P values
  __shared__ int s_count;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  if (r >= qn) return;
  const float* row = tile + r * gn;
  float* rv = run_v + r * k;
  int64_t* ri = run_i + r * k;
  int n = run_n[r];
  const float neg_inf = -INFINITY;
  for (int s = tid; s < P; s += blockDim.x) {
    sv[s] = s < n ? rv[s] : neg_inf;
    si[s] = s < n ? ri[s] : kTopkNoIndex;
  }
  __syncthreads();
  const int64_t self_col = exclude_self ? row0 + r + q_offset - g0 : -1;
  int64_t narrow_until = 0;  // columns before it go P at a time (a wide round overflowed)
  for (int64_t c0 = 0; c0 < gn;) {
    const bool full = n >= k;  // uniform: n only changes below, after a barrier
    const float thr_v = full ? sv[k - 1] : neg_inf;
    const int64_t thr_i = full ? si[k - 1] : kTopkNoIndex;
    const int64_t width = full && c0 >= narrow_until ? wide : P;
    if (tid == 0) s_count = 0;
    __syncthreads();
    const int64_t c1 = gn - c0 < width ? gn : c0 + width;
    for (int64_t j = c0 + tid; j < c1; j += blockDim.x) {
      const float v = row[j];
      if (j != self_col && (!full || topk_better(v, g0 + j, thr_v, thr_i))) {
        const int pos = atomicAdd(&s_count, 1);  // < P in a round of P columns
        if (pos < P) {
          sv[P + pos] = v;
          si[P + pos] = g0 + j;
        }
      }
    }
    __syncthreads();
    const int cnt = s_count;
    __syncthreads();  // every thread has read s_count before thread 0 resets it
    if (cnt > P) {  // uniform; only a wide round: scan its columns again, P at a time
      narrow_until = c1;
      continue;
    }
    c0 = c1;
    if (cnt == 0) continue;  // uniform across the block
    for (int s = P + cnt + tid; s < 2 * P; s += blockDim.x) {
      sv[s] = neg_inf;
      si[s] = kTopkNoIndex;
    }
    __syncthreads();
    for (int size = 2; size <= 2 * P; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int i = tid; i < 2 * P; i += blockDim.x) {
          if ((i ^ stride) > i) topk_bitonic_step(sv, si, i, size, stride);
        }
        __syncthreads();
      }
    }
    n = n + cnt < k ? n + cnt : k;
    for (int s = k + tid; s < P; s += blockDim.x) {  // drop everything past the k-th
      sv[s] = neg_inf;
      si[s] = kTopkNoIndex;
    }
    __syncthreads();
  }
  for (int s = tid; s < n; s += blockDim.x) {
    rv[s] = sv[s];
    ri[s] = si[s];
  }
  if (tid == 0) run_n[r] = n;
}

// Slots left at the sentinel index (a row whose similarities are all NaN, from fp32 overflow
// of finite inputs) are not counted rather than written out of bounds.
__global__ void count_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t G,
                             unsigned long long* __restrict__ counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const int64_t i = idx[e];
  if (i >= 0 && i < G) atomicAdd(counts + i, 1ULL);
}

}  // namespace topk_cuda

struct TopkCudaTiling {
  int64_t q_chunk = kTopkCudaQChunk;
  int64_t g_tile = kTopkCudaGTile;
  int64_t rounds = 16;  // a full list's scan round, in units of P columns (1: P-column rounds)
};

// The topk_cuda_rounds setting (csrc/common/settings.h), already checked in [1, 4096].
inline int64_t topk_cuda_rounds_setting() {
  return kernel_settings().topk_cuda_rounds.load(std::memory_order_relaxed);
}

// As topk_centrality_cpu_run (csrc/cpu/topk_engine.h): values [Q,k] fp32, indices [Q,k]
// int64 written; counts [G] int64 accumulated. Arguments already checked;
// the caller holds the device guard. tile_fn(q0, qn, g0, gn, out) fills out [qn, gn] fp32.
template <class TileFn>
void topk_centrality_cuda_run(int64_t Q, int64_t G, int64_t k, bool exclude_self, int64_t q_offset,
                              TileFn&& tile_fn, at::Tensor& values, at::Tensor& indices, at::Tensor& counts,
                              TopkCudaTiling tiling = {}) {
  using namespace topk_cuda;
  if (Q == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t qc = std::max<int64_t>(1, std::min(tiling.q_chunk, Q));
  const int64_t gt = std::max<int64_t>(1, std::min(tiling.g_tile, G));
  const auto opts = values.options();
  at::Tensor tile_buf = at::empty({qc * gt}, opts.dtype(at::kFloat));
  at::Tensor run_n = at::empty({qc}, opts.dtype(at::kInt));
  const int P = select_slots(k);
  const int64_t wide = static_cast<int64_t>(P) * std::max<int64_t>(1, tiling.rounds);
  const size_t smem = static_cast<size_t>(2 * P) * (sizeof(float) + sizeof(int64_t));
  for (int64_t q0 = 0; q0 < Q; q0 += qc) {
    const int64_t qn = std::min(qc, Q - q0);
    run_n.zero_();
    float* rv = values.data_ptr<float>() + q0 * k;
    int64_t* ri = indices.data_ptr<int64_t>() + q0 * k;
    for (int64_t g0 = 0; g0 < G; g0 += gt) {
      const int64_t gn = std::min(gt, G - g0);
      at::Tensor tile = tile_buf.narrow(0, 0, qn * gn).view({qn, gn});
      tile_fn(q0, qn, g0, gn, tile);
      const float* tp = tile.const_data_ptr<float>();
      select_tile_kernel<<<static_cast<unsigned>(qn), kSelectThreads, smem, stream>>>(
          tp, qn, gn, g0, q0, exclude_self, q_offset, rv, ri, run_n.data_ptr<int>(), static_cast<int>(k), P,
          wide);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t ne = qn * k;
    count_kernel<<<static_cast<unsigned>((ne + 255) / 256), 256, 0, stream>>>(
        ri, ne, G, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace nbretr
