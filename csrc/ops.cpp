// Operator schemas, declared once. Each backend registers its kernels in its own file
// (csrc/cpu/<op>.cpp: TORCH_LIBRARY_IMPL(nbretr, CPU, m), csrc/cuda/<op>.cu:
// TORCH_LIBRARY_IMPL(nbretr, CUDA, m)); fake (meta) kernels and autograd live in Python
// next to the public functions in nbretr/ops/. The test-only operators are not here: see
// csrc/testing.h (torch.ops.nbretr_testing, registered only when a test asks).
#include <torch/library.h>

TORCH_LIBRARY(nbretr, m) {
  // docs/operators.md. Writes the first min(n, capacity) rows of every item into the matching
  // ring buffer in place, ending at slot `head` (see csrc/common/ring.h). The new head and
  // fill level are computed by the caller (nbretr.ops.ring_push).
  m.def("ring_push(Tensor(a!)[] buffers, Tensor[] items, int head) -> ()");

  // docs/operators.md. Batched log-domain Sinkhorn (csrc/common/sinkhorn.h). log_mu/log_nu are
  // always given (nbretr.ops.sinkhorn_log fills the defaults). Outputs in the compute dtype
  // (float64 for float64 scores, else float32); u_hist/v_hist [B, n_iters, M|N] hold the
  // potentials of every iteration run (rows past iters_done are 0) for the backward.
  m.def("sinkhorn_log(Tensor scores, Tensor log_mu, Tensor log_nu, int n_iters, float eps, float? tol) -> "
        "(Tensor log_plan, Tensor log_u, Tensor log_v, Tensor iters_done, Tensor u_hist, Tensor v_hist)");
  // Exact gradient of (log_plan, log_u, log_v) for the iterations run, by running them
  // backwards through u_hist/v_hist. Gradients in the dtypes of scores, log_mu, log_nu.
  m.def("sinkhorn_log_backward(Tensor grad_log_plan, Tensor grad_log_u, Tensor grad_log_v, Tensor scores, "
        "Tensor log_mu, Tensor log_nu, Tensor u_hist, Tensor v_hist, Tensor iters_done, float eps) -> "
        "(Tensor grad_scores, Tensor grad_log_mu, Tensor grad_log_nu)");

  // docs/operators.md. Token-wise (WTI) similarity s [Bt, Bv] (float32; float64 for float64
  // inputs) of texts t [Bt, L, D] and videos v [Bv, F, D]; masks [Bt, L] / [Bv, F] of any
  // real dtype, weights floating. See csrc/common/wti.h for the formula and tie rule.
  m.def("wti_similarity(Tensor t, Tensor t_mask, Tensor t_weight, Tensor v, Tensor v_mask, "
        "Tensor v_weight) -> Tensor");
  // Its backward: (grad_t, grad_t_weight, grad_v, grad_v_weight), each in its input's
  // dtype; the arg-maxes are recomputed, nothing is saved per pair by the forward.
  m.def("wti_similarity_backward(Tensor grad, Tensor t, Tensor t_mask, Tensor t_weight, Tensor v, "
        "Tensor v_mask, Tensor v_weight) -> (Tensor, Tensor, Tensor, Tensor)");

  // docs/operators.md, sim="dot". values [Q,k] fp32 and indices [Q,k] int64 of every query's
  // top-k (descending; ties: lower gallery index first); adds the k-occurrences into
  // counts [G] int64 and the similarity sums into sums [G] fp64 in place. exclude_self:
  // query row r is gallery item r + q_offset and is never a candidate (nor summed).
  m.def("topk_centrality_dot(Tensor q, Tensor g, int k, bool exclude_self, int q_offset, "
        "Tensor(a!) counts, Tensor(b!) sums) -> (Tensor, Tensor)");

  // docs/operators.md. For a score block [R, G] (float16/bfloat16/float32/float64): values
  // [R, k] (scores' dtype) and indices [R, k] int64 of every row's top-k, and ranks [R] int64
  // of every row's best target (targets [R, T] int64, -1 = padding; ranks [0] without
  // targets): 1 + the items scoring above it or equal with a lower index (topk_centrality's
  // tie rule); adds the k-occurrences into counts [G] int64 in place.
  m.def("topk_rank(Tensor scores, Tensor? targets, int k, Tensor(a!) counts) -> (Tensor, Tensor, Tensor)");
}
