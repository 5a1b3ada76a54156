// ring_push, CPU: per buffer at most two memcpy runs (the wrap-around split), O(batch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "common/ring.h"
#include "common/ring_checks.h"

namespace nbretr {
namespace {

void ring_push_cpu(at::TensorList buffers, at::TensorList items, int64_t head) {
  const int64_t n = check_ring_push_args(buffers, items, head, c10::DeviceType::CPU);
  const int64_t capacity = buffers[0].size(0);
  const int64_t kept = ring_kept(n, capacity);
  if (kept == 0) return;
  const int64_t new_head = ring_new_head(head, kept, capacity);
  const int64_t first = ring_first_run(new_head, kept, capacity);

  std::vector<at::Tensor> srcs;
  srcs.reserve(items.size());
  for (const auto& item : items) srcs.push_back(item.narrow(0, 0, kept).contiguous());

  // (buffer, run) pairs in parallel; each run is one memcpy.
  const int64_t tasks = static_cast<int64_t>(buffers.size()) * 2;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / 2;
      const bool wrapped = t % 2;
      const at::Tensor& buf = buffers[b];
      const int64_t row_bytes = buf.numel() / capacity * buf.element_size();
      const char* src = static_cast<const char*>(srcs[b].const_data_ptr());
      char* dst = static_cast<char*>(buf.mutable_data_ptr());
      if (row_bytes == 0) continue;
      if (!wrapped) {
        std::memcpy(dst + ring_slot(new_head, 0, capacity) * row_bytes, src, first * row_bytes);
      } else if (kept > first) {
        std::memcpy(dst, src + first * row_bytes, (kept - first) * row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) { m.impl("ring_push", &ring_push_cpu); }

}  // namespace nbretr
