// Torch-version switches shared by the kernels.
#pragma once
#include <torch/version.h>

// at::mm_out(out, a, b, out_dtype): fp16/bf16 inputs with an fp32 output (CUDA).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define NBRETR_HAS_MM_OUT_DTYPE 1
#else
#define NBRETR_HAS_MM_OUT_DTYPE 0
#endif

#include <ATen/Context.h>
#include <c10/core/ScalarType.h>

namespace nbretr {

// Whether a CUDA product of fp16/bf16 inputs may write fp32 directly (mm with out_dtype).
// Not for fp16 while the user allows fp16 accumulation in cuBLAS
// (torch.backends.cuda.matmul.allow_fp16_accumulation): torch refuses fp16 inputs with an
// fp32 output then, so the inputs are upcast to fp32 instead (same fp32 accumulation).
inline bool half_mm_out_float(at::ScalarType dtype) {
#if NBRETR_HAS_MM_OUT_DTYPE
  return !(dtype == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS());
#else
  (void)dtype;
  return false;
#endif
}

}  // namespace nbretr
