// ring_push, CPU: per buffer at most two memcpy runs (the wrap-around split), O(batch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

  // Every buffer's write is at most two contiguous runs (csrc/common/ring.h); split the
  // runs into chunks so that both cores share a large buffer's copy.
  struct Piece {
    char* dst;
    const char* src;
    int64_t bytes;
  };
  constexpr int64_t kChunk = 1 << 18;
  std::vector<Piece> pieces;
  auto add_run = [&](char* dst, const char* src, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += kChunk) {
      pieces.push_back({dst + off, src + off, std::min(kChunk, bytes - off)});
    }
  };
  for (size_t b = 0; b < buffers.size(); ++b) {
    const int64_t row_bytes = buffers[b].numel() / capacity * buffers[b].element_size();
    const char* src = static_cast<const char*>(srcs[b].const_data_ptr());
    char* dst = static_cast<char*>(buffers[b].mutable_data_ptr());
    add_run(dst + ring_slot(new_head, 0, capacity) * row_bytes, src, first * row_bytes);
    add_run(dst, src + first * row_bytes, (kept - first) * row_bytes);
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) std::memcpy(pieces[p].dst, pieces[p].src, pieces[p].bytes);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) { m.impl("ring_push", &ring_push_cpu); }

}  // namespace nbretr
