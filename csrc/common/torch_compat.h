// Torch-version switches shared by the kernels.
#pragma once
#include <torch/version.h>

// at::mm_out(out, a, b, out_dtype): fp16/bf16 inputs with an fp32 output (CUDA).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define NBRETR_HAS_MM_OUT_DTYPE 1
#else
#define NBRETR_HAS_MM_OUT_DTYPE 0
#endif
