// Argument validation for wti_similarity and its backward, shared by the CPU and CUDA
// registrations; nbretr/ops/wti.py repeats the same checks with the same messages.
#pragma once
#include <ATen/ATen.h>

#include "common/check.h"

namespace nbretr {

struct WtiDims {
  int64_t Bt, Bv, L, F, D;
};

inline void check_wti_side(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                           const char* xn, const char* mn, const char* wn, const char* shape,
                           const char* two, const at::Tensor& t, c10::DeviceType device_type) {
  const char* op = "wti_similarity";
  NBRETR_CHECK_ARG(x.dim() == 3, op, xn, " must have shape ", shape, ", got ", x.sizes());
  NBRETR_CHECK_ARG(x.size(1) >= 1, op, xn, " must have at least one token (", shape, " with ",
                   two, " >= 1), got ", x.sizes());
  NBRETR_CHECK_ARG(x.device().type() == device_type && x.device() == t.device(), op, xn, " is on ",
                   x.device(), " but t is on ", t.device());
  NBRETR_CHECK_ARG(mask.device() == t.device(), op, mn, " is on ", mask.device(), " but t is on ", t.device());
  NBRETR_CHECK_ARG(weight.device() == t.device(), op, wn, " is on ", weight.device(), " but t is on ",
                   t.device());
  NBRETR_CHECK_ARG(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(1), op, mn,
                   " has shape ", mask.sizes(), " but ", xn, " has shape ", x.sizes(), "; expected [",
                   x.size(0), ", ", x.size(1), "]");
  NBRETR_CHECK_ARG(weight.dim() == 2 && weight.size(0) == x.size(0) && weight.size(1) == x.size(1), op,
                   wn, " has shape ", weight.sizes(), " but ", mn, " has shape ", mask.sizes(),
                   "; expected [", x.size(0), ", ", x.size(1), "]");
  NBRETR_CHECK_ARG(at::isFloatingType(weight.scalar_type()), op, wn, " has dtype ",
                   dtype_name(weight.scalar_type()), "; expected a floating dtype");
  NBRETR_CHECK_ARG(!at::isComplexType(mask.scalar_type()), op, mn, " has dtype ",
                   dtype_name(mask.scalar_type()), "; expected bool, integer or floating");
}

inline WtiDims check_wti_args(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                              const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                              c10::DeviceType device_type) {
  const char* op = "wti_similarity";
  const auto dt = t.scalar_type();
  NBRETR_CHECK_ARG(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
                   "t has dtype ", dtype_name(dt),
                   "; expected torch.float32, torch.float16, torch.bfloat16 or torch.float64");
  NBRETR_CHECK_ARG(v.scalar_type() == dt, op, "v has dtype ", dtype_name(v.scalar_type()), " but t has dtype ",
                   dtype_name(dt));
  check_wti_side(t, t_mask, t_weight, "t", "t_mask", "t_weight", "[Bt, L, D]", "L", t, device_type);
  check_wti_side(v, v_mask, v_weight, "v", "v_mask", "v_weight", "[Bv, F, D]", "F", t, device_type);
  NBRETR_CHECK_ARG(v.size(2) == t.size(2), op, "v has D=", v.size(2), " but t has D=", t.size(2),
                   "; t [Bt, L, D] and v [Bv, F, D] must share D");
  return {t.size(0), v.size(0), t.size(1), v.size(1), t.size(2)};
}

inline void check_wti_grad(const at::Tensor& grad, const WtiDims& d, const at::Tensor& t) {
  const char* op = "wti_similarity_backward";
  NBRETR_CHECK_ARG(grad.dim() == 2 && grad.size(0) == d.Bt && grad.size(1) == d.Bv, op, "grad has shape ",
                   grad.sizes(), "; expected [Bt, Bv] = [", d.Bt, ", ", d.Bv, "]");
  NBRETR_CHECK_ARG(grad.device() == t.device(), op, "grad is on ", grad.device(), " but t is on ", t.device());
}

// accumulation / output dtype: float64 for float64 inputs, else float32
inline at::ScalarType wti_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace nbretr
