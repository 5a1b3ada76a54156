// torch.ops.nbretr_testing: the test-only operators (csrc/testing.h), registered on request.
#include "testing.h"

#include <memory>
#include <mutex>

namespace nbretr {
namespace testing {

void register_testing_ops() {
  static std::once_flag once;
  static std::unique_ptr<torch::Library> lib;
  std::call_once(once, [] {
    lib = std::make_unique<torch::Library>(torch::Library::DEF, "nbretr_testing", std::nullopt, __FILE__,
                                           static_cast<uint32_t>(__LINE__));
    define_wti_hooks(*lib);
    define_topk_hooks(*lib);
  });
}

}  // namespace testing
}  // namespace nbretr
