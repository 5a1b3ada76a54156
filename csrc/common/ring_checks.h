// Argument validation for ring_push, shared by the CPU and CUDA registrations so that
// both backends accept the same inputs and fail with the same messages.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/check.h"

namespace nbretr {

// Returns the batch length n shared by every item.
inline int64_t check_ring_push_args(at::TensorList buffers, at::TensorList items, int64_t head,
                                    c10::DeviceType device_type) {
  const char* op = "ring_push";
  NBRETR_CHECK_ARG(!buffers.empty(), op, "buffers must be a non-empty list of tensors");
  NBRETR_CHECK_ARG(items.size() == buffers.size(), op, "items has ", items.size(),
                   " tensors but buffers has ", buffers.size(), "; pass one item per buffer");
  const int64_t capacity = buffers[0].dim() > 0 ? buffers[0].size(0) : 0;
  NBRETR_CHECK_ARG(capacity > 0, op, "buffers[0] must have shape [capacity, ...] with capacity >= 1, got ",
                   buffers[0].sizes());
  NBRETR_CHECK_ARG(head >= 0 && head < capacity, op, "head must be in [0, capacity=", capacity,
                   "), got ", head);
  const int64_t n = items[0].dim() > 0 ? items[0].size(0) : -1;
  const auto device = buffers[0].device();
  for (size_t b = 0; b < buffers.size(); ++b) {
    const auto& buf = buffers[b];
    const auto& item = items[b];
    NBRETR_CHECK_ARG(buf.device().type() == device_type && buf.device() == device, op, "buffers[", b,
                     "] is on ", buf.device(), " but buffers[0] is on ", device,
                     "; every buffer and item must be on one device");
    NBRETR_CHECK_ARG(item.device() == device, op, "items[", b, "] is on ", item.device(),
                     " but the buffers are on ", device, "; move it with .to(", device, ")");
    NBRETR_CHECK_ARG(buf.dim() >= 1 && buf.size(0) == capacity, op, "buffers[", b, "] has shape ",
                     buf.sizes(), " but buffers[0] has capacity ", capacity,
                     "; every buffer must have the same number of rows");
    NBRETR_CHECK_ARG(buf.is_contiguous(), op, "buffers[", b, "] must be contiguous");
    NBRETR_CHECK_ARG(item.dim() == buf.dim(), op, "items[", b, "] has shape ", item.sizes(),
                     " but buffers[", b, "] has shape ", buf.sizes(), "; expected [n",
                     buf.dim() > 1 ? ", " : "", buf.sizes().slice(1), "]");
    NBRETR_CHECK_ARG(item.sizes().slice(1) == buf.sizes().slice(1), op, "items[", b, "] has shape ",
                     item.sizes(), " but buffers[", b, "] has rows of shape ", buf.sizes().slice(1));
    NBRETR_CHECK_ARG(item.scalar_type() == buf.scalar_type(), op, "items[", b, "] has dtype ",
                     dtype_name(item.scalar_type()), " but buffers[", b, "] has dtype ", dtype_name(buf.scalar_type()));
    NBRETR_CHECK_ARG(item.size(0) == n, op, "items[", b, "] has ", item.size(0),
                     " rows but items[0] has ", n, "; every item must hold the same batch");
  }
  return n;
}

}  // namespace nbretr
