// The extension's kernel variants, one process-wide object set from Python
// (nbretr.ops.set_kernel_settings / nbretr.ops.kernel_settings, docs/configuration.md) and
// never read from the environment. Process-wide rather than per thread: the autograd engine
// runs CUDA backwards on its own threads, which must see the forward's choice. Each field is
// read once per call by the kernel that uses it.
#pragma once
#include <atomic>
#include <cstdint>

namespace nbretr {

struct KernelSettings {
  // wti_similarity on CUDA: the fused tile kernel instead of the tiled driver (the default)
  std::atomic<bool> wti_cuda_fused{false};
  // wti_similarity on the CPU: leave masked tokens out of the products where that is exact
  std::atomic<bool> wti_cpu_compact{true};
  // topk_centrality on CUDA: a full list's scan round, in units of P columns (1: P-column rounds)
  std::atomic<int64_t> topk_cuda_rounds{16};
  // the widest x86 build the CPU kernels may use: 2 AVX-512, 1 AVX2+FMA+F16C, 0 baseline
  // (csrc/common/cpu_isa.h takes the smaller of this and what the CPU has)
  std::atomic<int> cpu_isa_cap{2};
};

inline KernelSettings& kernel_settings() {
  static KernelSettings s;
  return s;
}

}  // namespace nbretr
