// topk_centrality, sim="dot", CUDA: every tile is one matrix product on the current
// stream (at::mm_out: cuBLAS; fp16/bf16 with fp32 output where torch has and allows mm(out_dtype),
// else on fp32 casts), then selection and counts of csrc/cuda/topk_engine.cuh; the sums
// without tiles (csrc/common/topk_dot_sums.h, the CPU kernel's code).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/topk_checks.h"
#include "common/topk_dot_sums.h"
#include "common/torch_compat.h"
#include "cuda/topk_engine.cuh"

namespace nbretr {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_centrality_dot_cuda(const at::Tensor& q, const at::Tensor& g, int64_t k,
                                                            bool exclude_self, int64_t q_offset, at::Tensor& counts,
                                                            at::Tensor& sums) {
  check_topk_dot_args(q, g, k, exclude_self, q_offset, counts, sums, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t Q = q.size(0), G = g.size(0);
  at::Tensor values = at::empty({Q, k}, q.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  if (Q == 0) return {values, indices};
  // fp16/bf16: products with an fp32 output where torch allows it, else on upcast inputs
  const bool half_mm = q.scalar_type() != at::kFloat && half_mm_out_float(q.scalar_type());
  const bool upcast = q.scalar_type() != at::kFloat && !half_mm;
  const at::Tensor qc = upcast ? q.to(at::kFloat).contiguous() : q.contiguous();
  const at::Tensor gc = upcast ? g.to(at::kFloat).contiguous() : g.contiguous();
  auto tile_fn = [&](int64_t q0, int64_t qn, int64_t g0, int64_t gn, at::Tensor& out) {
    const at::Tensor a = qc.narrow(0, q0, qn);
    const at::Tensor b = gc.narrow(0, g0, gn).t();
#if NBRETR_HAS_MM_OUT_DTYPE
    if (half_mm) {
      at::mm_out(out, a, b, at::kFloat);
      return;
    }
#endif
    at::mm_out(out, a, b);
  };
  TopkCudaTiling tiling;
  tiling.rounds = topk_cuda_rounds_setting();
  topk_centrality_cuda_run(Q, G, k, exclude_self, q_offset, tile_fn, values, indices, counts, tiling);
  topk_add_dot_sums(qc, gc, exclude_self, q_offset, sums);
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CUDA, m) { m.impl("topk_centrality_dot", &topk_centrality_dot_cuda); }

}  // namespace nbretr
