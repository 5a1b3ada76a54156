// The Python module nbretr._C: loading it registers the operators (ops.cpp and the
// kernel files); it exposes the facts of the build.
#include <pybind11/pybind11.h>

#include "common/cpu_isa.h"
#include "common/topk_tiles.h"

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
        "(NBRETR_CPU_ISA=avx512|avx2|base caps it)");
  pybind11::dict tiles;  // the top-k engines' default (query chunk, gallery tile)
  tiles["cpu"] = pybind11::make_tuple(nbretr::kTopkCpuQChunk, nbretr::kTopkCpuGTile);
  tiles["cuda"] = pybind11::make_tuple(nbretr::kTopkCudaQChunk, nbretr::kTopkCudaGTile);
  m.attr("topk_tiles") = tiles;
}
