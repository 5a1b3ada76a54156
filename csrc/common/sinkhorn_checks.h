// Argument validation for sinkhorn_log / sinkhorn_log_backward, shared by the CPU and
// CUDA registrations (same inputs accepted, same messages as nbretr/ops/sinkhorn.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/check.h"

namespace nbretr {

// Compute dtype: float64 for float64 scores, float32 otherwise (fp16/bf16 are upcast).
inline at::ScalarType sinkhorn_acc_type(const at::Tensor& scores) {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_sinkhorn_args(const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
                                int64_t n_iters, double eps, std::optional<double> tol,
                                c10::DeviceType device_type) {
  const char* op = "sinkhorn_log";
  NBRETR_CHECK_ARG(scores.dim() == 3, op, "scores must be a 3-D tensor [B, M, N], got shape ", scores.sizes());
  const auto st = scores.scalar_type();
  NBRETR_CHECK_ARG(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   "scores must be float16, bfloat16, float32 or float64, got ", dtype_name(st));
  NBRETR_CHECK_ARG(scores.device().type() == device_type, op, "scores is on ", scores.device());
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  const auto check_marginal = [&](const at::Tensor& t, const char* name, int64_t len, const char* dim) {
    NBRETR_CHECK_ARG(t.device() == scores.device(), op, name, " is on ", t.device(), " but scores is on ",
                     scores.device());
    NBRETR_CHECK_ARG(t.dim() == 2 && t.size(0) == B && t.size(1) == len, op, name, " must have shape [B, ",
                     dim, "] = [", B, ", ", len, "], got ", t.sizes());
    NBRETR_CHECK_ARG(at::isFloatingType(t.scalar_type()), op, name, " must be a floating tensor, got ",
                     dtype_name(t.scalar_type()));
  };
  check_marginal(log_mu, "log_mu", M, "M");
  check_marginal(log_nu, "log_nu", N, "N");
  NBRETR_CHECK_ARG(n_iters >= 0, op, "n_iters must be >= 0, got ", n_iters);
  NBRETR_CHECK_ARG(eps > 0 && std::isfinite(eps), op, "eps must be a positive finite number, got ", eps);
  if (tol.has_value()) {
    NBRETR_CHECK_ARG(*tol >= 0 && !std::isnan(*tol), op, "tol must be >= 0 (or None), got ", *tol);
  }
}

// A row or column whose scores are all -inf has no feasible plan. Reports the first one
// (lowest problem; rows before columns; lowest index). One device sync on CUDA.
inline void check_sinkhorn_masks(const at::Tensor& scores) {
  if (scores.numel() == 0) return;
  const int64_t M = scores.size(1), N = scores.size(2);
  const auto neg = at::isneginf(scores);
  const auto bad_rows = neg.all(2);  // [B, M]
  const auto bad_cols = neg.all(1);  // [B, N]
  if (!at::logical_or(bad_rows.any(), bad_cols.any()).item<bool>()) return;
  const auto rows_per_b = bad_rows.any(1).cpu(), cols_per_b = bad_cols.any(1).cpu();
  const auto* r = rows_per_b.const_data_ptr<bool>();
  const auto* c = cols_per_b.const_data_ptr<bool>();
  for (int64_t b = 0; b < scores.size(0); ++b) {
    if (r[b]) {
      const int64_t i = bad_rows[b].to(at::kByte).argmax().item<int64_t>();
      NBRETR_CHECK_ARG(false, "sinkhorn_log", "scores[", b, ", ", i, ", :] is entirely -inf (problem ", b,
                       ", row ", i, " of ", M,
                       " is fully masked); every row and column needs at least one finite score");
    }
    if (c[b]) {
      const int64_t j = bad_cols[b].to(at::kByte).argmax().item<int64_t>();
      NBRETR_CHECK_ARG(false, "sinkhorn_log", "scores[", b, ", :, ", j, "] is entirely -inf (problem ", b,
                       ", column ", j, " of ", N,
                       " is fully masked); every row and column needs at least one finite score");
    }
  }
}

inline void check_sinkhorn_backward_args(const at::Tensor& grad_log_plan, const at::Tensor& grad_log_u,
                                         const at::Tensor& grad_log_v, const at::Tensor& scores,
                                         const at::Tensor& log_mu, const at::Tensor& log_nu,
                                         const at::Tensor& u_hist, const at::Tensor& v_hist,
                                         const at::Tensor& iters_done, double eps, c10::DeviceType device_type) {
  const char* op = "sinkhorn_log_backward";
  check_sinkhorn_args(scores, log_mu, log_nu, 0, eps, std::nullopt, device_type);
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  const auto acc = sinkhorn_acc_type(scores);
  const auto same = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dt) {
    NBRETR_CHECK_ARG(t.device() == scores.device(), op, name, " is on ", t.device(), " but scores is on ",
                     scores.device());
    NBRETR_CHECK_ARG(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
    NBRETR_CHECK_ARG(t.scalar_type() == dt, op, name, " must have dtype ", dtype_name(dt), ", got ",
                     dtype_name(t.scalar_type()));
  };
  same(grad_log_plan, "grad_log_plan", {B, M, N}, acc);
  same(grad_log_u, "grad_log_u", {B, M}, acc);
  same(grad_log_v, "grad_log_v", {B, N}, acc);
  NBRETR_CHECK_ARG(u_hist.dim() == 3, op, "u_hist must have shape [B, n_iters, M], got ", u_hist.sizes());
  const int64_t T = u_hist.size(1);
  same(u_hist, "u_hist", {B, T, M}, acc);
  same(v_hist, "v_hist", {B, T, N}, acc);
  same(iters_done, "iters_done", {B}, at::kLong);
}

}  // namespace nbretr
