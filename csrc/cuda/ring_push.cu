// ring_push, CUDA: one launch writes the kept rows of every item into its ring buffer.
// Each buffer is copied as raw bytes in the widest unit (16/8/4/2/1 bytes) that its
// row size and both base addresses allow; blockIdx.y selects the buffer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/ring.h"
#include "common/ring_checks.h"

namespace nbretr {
namespace {

constexpr int kMaxRingBuffers = 16;

struct RingCopyArgs {
  char* dst[kMaxRingBuffers];
  const char* src[kMaxRingBuffers];
  int64_t units_per_row[kMaxRingBuffers];  // row size in units of `unit` bytes
  int unit[kMaxRingBuffers];
  int64_t kept, new_head, capacity;
};

template <typename U>
__device__ __forceinline__ void copy_rows(char* dst, const char* src, int64_t upr, int64_t kept,
                                          int64_t new_head, int64_t capacity) {
  const int64_t total = upr * kept;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += stride) {
    const int64_t row = u / upr;
    const int64_t col = u - row * upr;
    const int64_t slot = ring_slot(new_head, row, capacity);
    reinterpret_cast<U*>(dst)[slot * upr + col] = reinterpret_cast<const U*>(src)[u];
  }
}

__global__ void ring_push_kernel(const __grid_constant__ RingCopyArgs args) {
  const int b = blockIdx.y;
  const int64_t upr = args.units_per_row[b];
  switch (args.unit[b]) {
    case 16: copy_rows<uint4>(args.dst[b], args.src[b], upr, args.kept, args.new_head, args.capacity); break;
    case 8: copy_rows<uint2>(args.dst[b], args.src[b], upr, args.kept, args.new_head, args.capacity); break;
    case 4: copy_rows<uint32_t>(args.dst[b], args.src[b], upr, args.kept, args.new_head, args.capacity); break;
    case 2: copy_rows<uint16_t>(args.dst[b], args.src[b], upr, args.kept, args.new_head, args.capacity); break;
    default: copy_rows<uint8_t>(args.dst[b], args.src[b], upr, args.kept, args.new_head, args.capacity); break;
  }
}

int widest_unit(int64_t row_bytes, const void* a, const void* b) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  for (int u : {16, 8, 4, 2}) {
    if (row_bytes % u == 0 && pa % u == 0 && pb % u == 0) return u;
  }
  return 1;
}

void ring_push_cuda(at::TensorList buffers, at::TensorList items, int64_t head) {
  const int64_t n = check_ring_push_args(buffers, items, head, c10::DeviceType::CUDA);
  NBRETR_CHECK_ARG(buffers.size() <= kMaxRingBuffers, "ring_push", "at most ", kMaxRingBuffers,
                   " buffers per call on CUDA, got ", buffers.size());
  const int64_t capacity = buffers[0].size(0);
  const int64_t kept = ring_kept(n, capacity);
  if (kept == 0) return;
  c10::cuda::CUDAGuard guard(buffers[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  RingCopyArgs args{};
  args.kept = kept;
  args.capacity = capacity;
  args.new_head = ring_new_head(head, kept, capacity);
  std::vector<at::Tensor> srcs;
  srcs.reserve(items.size());
  int64_t max_units = 0;
  for (size_t b = 0; b < buffers.size(); ++b) {
    srcs.push_back(items[b].narrow(0, 0, kept).contiguous());
    const int64_t row_bytes = buffers[b].numel() / capacity * buffers[b].element_size();
    args.dst[b] = static_cast<char*>(buffers[b].mutable_data_ptr());
    args.src[b] = static_cast<const char*>(srcs[b].const_data_ptr());
    args.unit[b] = widest_unit(row_bytes, args.dst[b], args.src[b]);
    args.units_per_row[b] = row_bytes / args.unit[b];
    max_units = std::max(max_units, args.units_per_row[b] * kept);
  }
  if (max_units == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((max_units + threads - 1) / threads, 4096);
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(buffers.size()));
  ring_push_kernel<<<grid, threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CUDA, m) { m.impl("ring_push", &ring_push_cuda); }

}  // namespace nbretr
