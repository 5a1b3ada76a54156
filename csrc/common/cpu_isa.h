// The x86 vector extensions the CPU kernels may use, picked once at run time (the build
// has no -march): 2 = AVX-512 (F, VL, DQ, BW), 1 = AVX2 + FMA + F16C, 0 = baseline x86-64.
// NBRETR_CPU_ISA=avx512|avx2|base caps the choice, so that tests and benchmarks run every
// path on one machine. Any other value is an error that names the variable.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace nbretr {

inline int cpu_isa_level() {
  static const int level = [] {
    int hw = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      hw = 1;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
        hw = 2;
    }
#endif
    const char* cap = std::getenv("NBRETR_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return hw;
    const int want = std::strcmp(cap, "avx512") == 0 ? 2 : std::strcmp(cap, "avx2") == 0 ? 1
                     : std::strcmp(cap, "base") == 0 ? 0 : -1;
    TORCH_CHECK(want >= 0, "nbretr: NBRETR_CPU_ISA must be avx512, avx2 or base, got '", cap, "'");
    return std::min(hw, want);
  }();
  return level;
}

}  // namespace nbretr
