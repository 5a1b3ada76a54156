// Shared by the CPU (.cpp) and CUDA (.cu) kernels: code in csrc/common/ is compiled
// into both, so the CPU tests exercise the per-element logic that the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NBRETR_HD __host__ __device__ __forceinline__
#else
#define NBRETR_HD inline
#endif
