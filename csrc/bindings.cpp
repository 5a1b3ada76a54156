// The Python module nbretr._C: loading it registers the operators (ops.cpp and the
// kernel files); it exposes the facts of the build, the kernel settings and, for the
// tests, the registration of the test-only operators.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include "common/cpu_isa.h"
#include "common/settings.h"
#include "common/topk_tiles.h"
#include "testing.h"

#ifndef NBRETR_WITH_CUDA
#define NBRETR_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "nbretr C++/CUDA kernels (operators under torch.ops.nbretr)";
  m.attr("cuda_compiled") = static_cast<bool>(NBRETR_WITH_CUDA);
  m.attr("torch_version") = NBRETR_TORCH_VERSION;
  m.attr("cuda_version") = NBRETR_CUDA_VERSION;
  m.attr("cuda_archs") = NBRETR_CUDA_ARCHS;
  m.def("cpu_isa_level", &nbretr::cpu_isa_level,
        "x86 vector extensions the CPU kernels use: 2 AVX-512, 1 AVX2+FMA+F16C, 0 baseline "
        "(the cpu_isa kernel setting caps it)");
  m.def("cpu_isa_hw_level", &nbretr::cpu_isa_hw_level, "the level the CPU has (before the cap)");
  // The kernel settings (csrc/common/settings.h), checked and set by nbretr.ops.settings.
  m.def(
      "_set_kernel_settings",
      [](bool wti_cuda_fused, bool wti_cpu_compact, int64_t topk_cuda_rounds, int cpu_isa_cap) {
        TORCH_CHECK(topk_cuda_rounds >= 1 && topk_cuda_rounds <= 4096, "topk_cuda_rounds out of range");
        TORCH_CHECK(cpu_isa_cap >= 0 && cpu_isa_cap <= 2, "cpu_isa_cap out of range");
        auto& s = nbretr::kernel_settings();
        s.wti_cuda_fused = wti_cuda_fused;
        s.wti_cpu_compact = wti_cpu_compact;
        s.topk_cuda_rounds = topk_cuda_rounds;
        s.cpu_isa_cap = cpu_isa_cap;
      },
      pybind11::arg("wti_cuda_fused"), pybind11::arg("wti_cpu_compact"), pybind11::arg("topk_cuda_rounds"),
      pybind11::arg("cpu_isa_cap"));
  m.def("_kernel_settings", [] {
    const auto& s = nbretr::kernel_settings();
    pybind11::dict d;
    d["wti_cuda_fused"] = s.wti_cuda_fused.load();
    d["wti_cpu_compact"] = s.wti_cpu_compact.load();
    d["topk_cuda_rounds"] = s.topk_cuda_rounds.load();
    d["cpu_isa_cap"] = s.cpu_isa_cap.load();
    return d;
  });
  m.def("_register_testing_ops", &nbretr::testing::register_testing_ops,
        "define the test-only operators, torch.ops.nbretr_testing (csrc/testing.h); for tests only");
  pybind11::dict tiles;  // the top-k engines' default (query chunk, gallery tile)
  tiles["cpu"] = pybind11::make_tuple(nbretr::kTopkCpuQChunk, nbretr::kTopkCpuGTile);
  tiles["cuda"] = pybind11::make_tuple(nbretr::kTopkCudaQChunk, nbretr::kTopkCudaGTile);
  m.attr("topk_tiles") = tiles;
}
