// Ring-buffer index arithmetic for ring_push / ring_view (docs/operators.md).
//
// Layout invariant: the bank's rows, newest first, are the physical rows
// head, head+1, ..., head+filled-1 (mod capacity). Pushing a batch of n rows keeps its
// first m = min(n, capacity) rows, moves head back by m and writes batch row i at
// (new_head + i) mod capacity, so the new batch precedes the old rows in order: this is
// exactly `cat((batch, bank))[:capacity]`.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace nbretr {

// rows of a batch of `n` that survive in a bank of `capacity`
NBRETR_HD int64_t ring_kept(int64_t n, int64_t capacity) { return n < capacity ? n : capacity; }

// head after pushing `kept` rows (kept <= capacity)
NBRETR_HD int64_t ring_new_head(int64_t head, int64_t kept, int64_t capacity) {
  int64_t h = head - kept;
  return h < 0 ? h + capacity : h;
}

// physical slot of batch row i (0 <= i < kept) once written at new_head
NBRETR_HD int64_t ring_slot(int64_t new_head, int64_t i, int64_t capacity) {
  int64_t s = new_head + i;
  return s >= capacity ? s - capacity : s;
}

NBRETR_HD int64_t ring_new_filled(int64_t filled, int64_t kept, int64_t capacity) {
  int64_t f = filled + kept;
  return f < capacity ? f : capacity;
}

// The write of `kept` rows starting at new_head as at most two contiguous runs of slots:
// [new_head, new_head + first) and [0, kept - first).
NBRETR_HD int64_t ring_first_run(int64_t new_head, int64_t kept, int64_t capacity) {
  int64_t room = capacity - new_head;
  return kept < room ? kept : room;
}

}  // namespace nbretr
