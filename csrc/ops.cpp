// Operator schemas, declared once. Each backend registers its kernels in its own file
// (csrc/cpu/<op>.cpp: TORCH_LIBRARY_IMPL(nbretr, CPU, m), csrc/cuda/<op>.cu:
// TORCH_LIBRARY_IMPL(nbretr, CUDA, m)); fake (meta) kernels and autograd live in Python
// next to the public functions in nbretr/ops/.
#include <torch/library.h>

TORCH_LIBRARY(nbretr, m) {
  // KERNELS.md 3. Writes the first min(n, capacity) rows of every item into the matching
  // ring buffer in place, ending at slot `head` (see csrc/common/ring.h). The new head and
  // fill level are computed by the caller (nbretr.ops.ring_push).
  m.def("ring_push(Tensor(a!)[] buffers, Tensor[] items, int head) -> ()");
  // KERNELS.md 2, sim="dot". values [Q,k] fp32 and indices [Q,k] int64 of every query's
  // top-k (descending; ties: lower gallery index first); adds the k-occurrences into
  // counts [G] int64 and the similarity sums into sums [G] fp64 in place. exclude_self:
  // query row r is gallery item r + q_offset and is never a candidate (nor summed).
  m.def("topk_centrality_dot(Tensor q, Tensor g, int k, bool exclude_self, int q_offset, "
        "Tensor(a!) counts, Tensor(b!) sums) -> (Tensor, Tensor)");
}
