// The x86 vector extensions the CPU kernels may use, picked once at run time (the build
// has no -march): 2 = AVX-512 (F, VL, DQ, BW), 1 = AVX2 + FMA + F16C, 0 = baseline x86-64.
// The cpu_isa setting (csrc/common/settings.h; nbretr.ops.kernel_settings(cpu_isa=...)) caps
// the choice, so that tests and benchmarks run every path on one machine.
#pragma once
#include <algorithm>

#include "common/settings.h"

namespace nbretr {

// What the CPU has, detected once.
inline int cpu_isa_hw_level() {
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
    return hw;
  }();
  return level;
}

// The level the CPU kernels use now: what the CPU has, capped by the cpu_isa setting.
inline int cpu_isa_level() {
  return std::min(cpu_isa_hw_level(), kernel_settings().cpu_isa_cap.load(std::memory_order_relaxed));
}

}  // namespace nbretr
