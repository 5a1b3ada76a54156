// Argument validation for topk_centrality, shared by the CPU and CUDA registrations so
// that both backends accept the same inputs and fail with the same messages (the Python
// wrapper nbretr/ops/topk.py repeats them word for word).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "common/check.h"
#include "common/topk.h"

namespace nbretr {

inline bool topk_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// k, exclude_self/q_offset and the accumulators, for Q queries against G gallery items.
inline void check_topk_common(const char* op, int64_t Q, int64_t G, int64_t k, bool exclude_self,
                              int64_t q_offset, const at::Tensor& counts, const at::Tensor& sums,
                              const at::Device& device) {
  NBRETR_CHECK_ARG(k >= 1 && k <= kTopkMaxK, op, "k must be in [1, ", kTopkMaxK, "], got ", k);
  if (exclude_self) {
    NBRETR_CHECK_ARG(q_offset >= 0 && q_offset + Q <= G, op,
                     "exclude_self needs q_offset >= 0 and q_offset + Q <= G (query row r is gallery item "
                     "r + q_offset), got q_offset=", q_offset, ", Q=", Q, ", G=", G);
  }
  const int64_t avail = exclude_self ? G - 1 : G;
  NBRETR_CHECK_ARG(k <= avail, op, "k=", k, " exceeds the ", avail, " gallery items a query can get (G=", G,
                   exclude_self ? ", exclude_self" : "", "); pass k <= ", avail);
  NBRETR_CHECK_ARG(counts.dim() == 1 && counts.size(0) == G, op, "counts must have shape [G=", G, "], got ",
                   counts.sizes());
  NBRETR_CHECK_ARG(counts.scalar_type() == at::kLong, op, "counts must have dtype torch.int64, got ",
                   dtype_name(counts.scalar_type()));
  NBRETR_CHECK_ARG(counts.device() == device, op, "counts is on ", counts.device(), " but q is on ", device,
                   "; every tensor must be on one device");
  NBRETR_CHECK_ARG(counts.is_contiguous(), op, "counts must be contiguous");
  NBRETR_CHECK_ARG(sums.dim() == 1 && sums.size(0) == G, op, "sums must have shape [G=", G, "], got ",
                   sums.sizes());
  NBRETR_CHECK_ARG(sums.scalar_type() == at::kDouble, op, "sums must have dtype torch.float64, got ",
                   dtype_name(sums.scalar_type()));
  NBRETR_CHECK_ARG(sums.device() == device, op, "sums is on ", sums.device(), " but q is on ", device,
                   "; every tensor must be on one device");
  NBRETR_CHECK_ARG(sums.is_contiguous(), op, "sums must be contiguous");
}

// max |x| over x, after checking that every element is finite (0 when x is empty)
inline double check_topk_finite(const char* op, const char* name, const at::Tensor& x) {
  if (x.numel() == 0) return 0;
  // one pass: min and max are finite iff every element is (NaN propagates)
  auto mm = at::aminmax(x);
  const double lo = std::get<0>(mm).item<double>(), hi = std::get<1>(mm).item<double>();
  NBRETR_CHECK_ARG(std::isfinite(lo) && std::isfinite(hi), op, name,
                   " contains NaN or Inf values; topk_centrality needs finite inputs");
  return std::max(std::fabs(lo), std::fabs(hi));
}

// Finite inputs can still give similarities past the float32 range (then Inf, and NaN from
// Inf - Inf), which no backend could rank alike. |q_i . g_j| <= D max|q| max|g|, so that
// bound must stay under half of float32's maximum (room for the products' rounding).
constexpr double kTopkSimLimit = 1.7014117331926443e38;  // FLT_MAX / 2

inline void check_topk_sim_range(const char* op, int64_t D, double max_q, double max_g) {
  const double bound = static_cast<double>(D) * max_q * max_g;
  NBRETR_CHECK_ARG(bound <= kTopkSimLimit, op,
                   "q and g may give similarities beyond the float32 range (D * max|q| * max|g| = ", bound,
                   " > ", kTopkSimLimit, "); scale them down");
}

// sim="dot": q [Q, D], g [G, D], one float dtype, one device.
inline void check_topk_dot_args(const at::Tensor& q, const at::Tensor& g, int64_t k, bool exclude_self,
                                int64_t q_offset, const at::Tensor& counts, const at::Tensor& sums,
                                c10::DeviceType device_type) {
  const char* op = "topk_centrality";
  NBRETR_CHECK_ARG(q.dim() == 2, op, "q must be a 2-D tensor [Q, D], got shape ", q.sizes());
  NBRETR_CHECK_ARG(g.dim() == 2, op, "g must be a 2-D tensor [G, D], got shape ", g.sizes());
  NBRETR_CHECK_ARG(q.size(1) == g.size(1), op, "q has D=", q.size(1), " features but g has D=", g.size(1));
  NBRETR_CHECK_ARG(topk_float_dtype(q.scalar_type()), op, "q has dtype ", dtype_name(q.scalar_type()),
                   "; expected torch.float32, torch.float16 or torch.bfloat16");
  NBRETR_CHECK_ARG(g.scalar_type() == q.scalar_type(), op, "g has dtype ", dtype_name(g.scalar_type()),
                   " but q has dtype ", dtype_name(q.scalar_type()), "; pass both in one dtype");
  NBRETR_CHECK_ARG(q.device().type() == device_type, op, "q is on ", q.device(), " (wrong kernel)");
  NBRETR_CHECK_ARG(g.device() == q.device(), op, "g is on ", g.device(), " but q is on ", q.device(),
                   "; every tensor must be on one device");
  check_topk_common(op, q.size(0), g.size(0), k, exclude_self, q_offset, counts, sums, q.device());
  const double max_q = check_topk_finite(op, "q", q);
  const double max_g = check_topk_finite(op, "g", g);
  check_topk_sim_range(op, q.size(1), max_q, max_g);
}

}  // namespace nbretr
