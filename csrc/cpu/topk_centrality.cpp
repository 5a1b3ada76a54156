// topk_centrality, sim="dot", CPU: every tile is one fp32 matrix product (at::mm_out, the
// BLAS/oneDNN GEMM, multithreaded) of a query chunk and a gallery tile; selection and
// counts are csrc/cpu/topk_engine.h. fp16/bf16 inputs are cast to fp32 (the query chunk
// per chunk, the gallery once: O(G*D) extra), so accumulation is fp32.
// The sums need no tile (csrc/common/topk_dot_sums.h, shared with CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/topk_checks.h"
#include "common/topk_dot_sums.h"
#include "cpu/topk_engine.h"
#include "testing.h"

namespace nbretr {
namespace {

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
  topk_add_dot_sums(qc, gf, exclude_self, q_offset, sums);
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
  NBRETR_CHECK_ARG(q_chunk >= 1 && g_tile >= 1 && epoch >= 1, "testing.topk_centrality_dot_tiled",
                   "q_chunk, g_tile and epoch must be >= 1, got ", q_chunk, ", ", g_tile, ", ", epoch);
  return topk_dot_cpu(q, g, k, exclude_self, q_offset, counts, sums, {q_chunk, g_tile, epoch});
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) { m.impl("topk_centrality_dot", &topk_centrality_dot_cpu); }

void testing::define_topk_hooks(torch::Library& m) {
  // topk_centrality_dot with the CPU engine's query chunk, gallery tile and epoch
  // (csrc/cpu/topk_engine.h) set, so that small inputs cross every boundary.
  m.def("topk_centrality_dot_tiled(Tensor q, Tensor g, int k, bool exclude_self, int q_offset, "
        "Tensor(a!) counts, Tensor(b!) sums, int q_chunk, int g_tile, int epoch) -> (Tensor, Tensor)");
  m.impl("topk_centrality_dot_tiled", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(topk_centrality_dot_tiled_cpu)));
}

}  // namespace nbretr
