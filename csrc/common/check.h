// Argument checks shared by every op: each message names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define NBRETR_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "nbretr.", op, ": ", __VA_ARGS__)

namespace nbretr {

// dtype as Python prints it ("torch.float16"), so CPU, CUDA and torch-path messages agree.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace nbretr
