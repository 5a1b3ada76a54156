// Argument validation for topk_rank (docs/operators.md), in the words of the Python
// wrapper nbretr/ops/topk_rank.py, which repeats them in the same order.
#pragma once
#include <ATen/ATen.h>

#include "common/check.h"

namespace nbretr {

inline bool topk_rank_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// scores [R, G] floating; targets (if defined) int64 [R, T], T >= 1; 0 <= k <= G; counts
// int64 [G], contiguous, on scores' device. Target values (-1 or in [0, G), one >= 0 per
// row) and NaN scores are checked by the kernel while it reads them.
inline void check_topk_rank_args(const at::Tensor& scores, const c10::optional<at::Tensor>& targets, int64_t k,
                                 const at::Tensor& counts, c10::DeviceType device_type) {
  const char* op = "topk_rank";
  NBRETR_CHECK_ARG(scores.dim() == 2, op, "scores must be a 2-D tensor [R, G], got shape ", scores.sizes());
  NBRETR_CHECK_ARG(topk_rank_dtype(scores.scalar_type()), op, "scores has dtype ",
                   dtype_name(scores.scalar_type()),
                   "; expected torch.float32, torch.float64, torch.float16 or torch.bfloat16");
  NBRETR_CHECK_ARG(scores.device().type() == device_type, op, "scores is on ", scores.device(),
                   " (wrong kernel)");
  const int64_t R = scores.size(0), G = scores.size(1);
  NBRETR_CHECK_ARG(k >= 0 && k <= G, op, "k must be in [0, G=", G, "], got ", k);
  if (targets.has_value() && targets->defined()) {
    const at::Tensor& t = *targets;
    NBRETR_CHECK_ARG(t.dim() == 2 && t.size(0) == R && t.size(1) >= 1, op,
                     "targets must have shape [R=", R, ", T >= 1], got ", t.sizes());
    NBRETR_CHECK_ARG(t.scalar_type() == at::kLong, op, "targets must have dtype torch.int64, got ",
                     dtype_name(t.scalar_type()));
    NBRETR_CHECK_ARG(t.device() == scores.device(), op, "targets is on ", t.device(), " but scores is on ",
                     scores.device(), "; every tensor must be on one device");
  }
  NBRETR_CHECK_ARG(counts.dim() == 1 && counts.size(0) == G, op, "counts must have shape [G=", G, "], got ",
                   counts.sizes());
  NBRETR_CHECK_ARG(counts.scalar_type() == at::kLong, op, "counts must have dtype torch.int64, got ",
                   dtype_name(counts.scalar_type()));
  NBRETR_CHECK_ARG(counts.device() == scores.device(), op, "counts is on ", counts.device(), " but scores is on ",
                   scores.device(), "; every tensor must be on one device");
  NBRETR_CHECK_ARG(counts.is_contiguous(), op, "counts must be contiguous");
}

}  // namespace nbretr
