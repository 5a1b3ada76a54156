// topk_centrality, sim="dot", CPU: every tile is one fp32 matrix product (at::mm_out, the
// BLAS/oneDNN GEMM, multithreaded) of a query chunk and a gallery tile; selection and
// counts are csrc/cpu/topk_engine.h. fp16/bf16 inputs are cast to fp32 (the query chunk
// per chunk, the gallery once: O(G*D) extra), so accumulation is fp32.
//
// The sums need no tile: by linearity sum_i q_i . g_j = (sum_i q_i) . g_j, computed in
// fp64 from the inputs (exactly representable there), with the own item's term left out
// under exclude_self. O((Q + G) * D) instead of one fp64 add per similarity; the result is
// the fp64 sum of the exact products, up to fp64 rounding, where the torch path adds the
// fp32 tile values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/topk_checks.h"
#include "cpu/topk_engine.h"

namespace nbretr {
namespace {

// sums[j] += sum_i q[i] . g[j] in fp64, leaving out i = j - q_offset under exclude_self.
// Deterministic: the query sum runs in row order, each j is one thread's.
void add_dot_sums(const at::Tensor& q, const at::Tensor& gf, bool exclude_self, int64_t q_offset, at::Tensor& sums) {
  const int64_t Q = q.size(0), G = gf.size(0), D = q.size(1);
  std::vector<double> qsum(D, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "topk_centrality_dot_sums", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < Q; ++i)
      for (int64_t d = 0; d < D; ++d) qsum[d] += static_cast<double>(qp[i * D + d]);
    const float* gp = gf.const_data_ptr<float>();
    double* sp = sums.data_ptr<double>();
    at::parallel_for(0, G, 64, [&](int64_t j0, int64_t j1) {
      std::vector<double> w(D);
      for (int64_t j = j0; j < j1; ++j) {
        const float* gj = gp + j * D;
        const int64_t own = j - q_offset;  // the query whose own item j is
        const double* qs = qsum.data();
        if (exclude_self && own >= 0 && own < Q) {
          const scalar_t* qo = qp + own * D;
          for (int64_t d = 0; d < D; ++d) w[d] = qsum[d] - static_cast<double>(qo[d]);
          qs = w.data();
        }
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent chains (no reassociation needed)
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
          for (int c = 0; c < 8; ++c) acc[c] += static_cast<double>(gj[d + c]) * qs[d + c];
        double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; d < D; ++d) s += static_cast<double>(gj[d]) * qs[d];
        sp[j] += s;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> topk_dot_cpu(const at::Tensor& q, const at::Tensor& g, int64_t k, bool exclude_self,
                                                int64_t q_offset, at::Tensor& counts, at::Tensor& sums,
                                                TopkCpuTiling tiling) {
  check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums, c10::DeviceType::CPU);
  const int64_t Q = q.size(0), G = g.size(0);
  at::Tensor values = at::empty({Q, k}, q.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  if (Q == 0) return {values, indices};
  const at::Tensor qc = q.contiguous();
  const at::Tensor gf = g.to(at::kFloat).contiguous();
  const bool cast_q = q.scalar_type() != at::kFloat;
  auto tile_fn = [&](int64_t q0, int64_t qn, int64_t g0, int64_t gn, at::Tensor& out) {
    at::Tensor qb = qc.narrow(0, q0, qn);
    if (cast_q) qb = qb.to(at::kFloat);
    at::mm_out(out, qb, gf.narrow(0, g0, gn).t());
  };
  topk_centrality_cpu_run(Q, G, k, exclude_self, q_offset, tile_fn, values, indices, counts, tiling);
  add_dot_sums(qc, gf, exclude_self, q_offset, sums);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_centrality_dot_cpu(const at::Tensor& q, const at::Tensor& g, int64_t k,
                                                           bool exclude_self, int64_t q_offset, at::Tensor& counts,
                                                           at::Tensor& sums) {
  return topk_dot_cpu(q, g, k, exclude_self, q_offset, counts, sums, {});
}

std::tuple<at::Tensor, at::Tensor> topk_centrality_dot_tiled_cpu(const at::Tensor& q, const at::Tensor& g, int64_t k,
                                                                 bool exclude_self, int64_t q_offset,
                                                                 at::Tensor& counts, at::Tensor& sums, int64_t q_chunk,
                                                                 int64_t g_tile, int64_t epoch) {
  NBRETR_CHECK_ARG(q_chunk >= 1 && g_tile >= 1 && epoch >= 1, "_topk_centrality_dot_tiled",
                   "q_chunk, g_tile and epoch must be >= 1, got ", q_chunk, ", ", g_tile, ", ", epoch);
  return topk_dot_cpu(q, g, k, exclude_self, q_offset, counts, sums, {q_chunk, g_tile, epoch});
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) {
  m.impl("topk_centrality_dot", &topk_centrality_dot_cpu);
  m.impl("_topk_centrality_dot_tiled", &topk_centrality_dot_tiled_cpu);
}

}  // namespace nbretr
