// The similarity sums of topk_centrality for sim="dot" (docs/operators.md: per gallery item, the
// sum of its similarities over all queries), without any tile: by linearity
// sum_i q_i . g_j = (sum_i q_i) . g_j, in fp64 from the inputs (exact there), minus the own
// item's term q_{j - q_offset} . g_j under exclude_self. O((Q + G) * D) work instead of an
// fp64 add per similarity, and one pass less over every tile.
//
// ATen operations only, so the CPU and the CUDA kernels run this very code and the CPU
// tests check it. The fp64 temporaries are bounded by chunks of kTopkSumChunk rows.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace nbretr {

constexpr int64_t kTopkSumChunk = 1024;

// sums [G] fp64 += the sums of q [Q, D] against g [G, D] (any float dtypes, one device).
inline void topk_add_dot_sums(const at::Tensor& q, const at::Tensor& g, bool exclude_self, int64_t q_offset,
                              at::Tensor& sums) {
  const int64_t Q = q.size(0), G = g.size(0);
  at::Tensor qsum = at::zeros({q.size(1)}, sums.options());
  for (int64_t i0 = 0; i0 < Q; i0 += kTopkSumChunk)
    qsum.add_(q.narrow(0, i0, std::min(kTopkSumChunk, Q - i0)).to(at::kDouble).sum(0));
  for (int64_t j0 = 0; j0 < G; j0 += kTopkSumChunk) {
    const int64_t n = std::min(kTopkSumChunk, G - j0);
    sums.narrow(0, j0, n).add_(at::mv(g.narrow(0, j0, n).to(at::kDouble), qsum));
  }
  if (!exclude_self) return;
  for (int64_t i0 = 0; i0 < Q; i0 += kTopkSumChunk) {  // query row i's own item: g[i + q_offset]
    const int64_t n = std::min(kTopkSumChunk, Q - i0);
    const at::Tensor own = at::mul(q.narrow(0, i0, n).to(at::kDouble), g.narrow(0, i0 + q_offset, n).to(at::kDouble));
    sums.narrow(0, i0 + q_offset, n).sub_(own.sum(1));
  }
}

}  // namespace nbretr
