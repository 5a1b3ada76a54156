// Test-only operators, outside the production schema (csrc/ops.cpp): they live in their own
// namespace, torch.ops.nbretr_testing, which exists only after a test calls
// nbretr._C._register_testing_ops() (tests/helpers.py, testing_ops()). Each kernel file
// that has hooks defines and implements them in its own function below.
#pragma once
#include <torch/library.h>

namespace nbretr {
namespace testing {

// csrc/cpu/wti_similarity.cpp: wti_tiled, wti_tiled_backward, wti_cpu_plan
void define_wti_hooks(torch::Library& m);
// csrc/cpu/topk_centrality.cpp: topk_centrality_dot_tiled
void define_topk_hooks(torch::Library& m);

// Define torch.ops.nbretr_testing (once; later calls do nothing).
void register_testing_ops();

}  // namespace testing
}  // namespace nbretr
