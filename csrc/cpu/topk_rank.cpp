// topk_rank, CPU (docs/operators.md): one pass over every row of a score block gives the
// row's top-k (a bounded heap, O(G log k)) and the rank of its best target (a count of
// the items ordered before it, O(G)), with topk_centrality's order: descending score,
// equal scores by ascending column index (csrc/common/topk.h). Rows run in parallel;
// the k-occurrence counts are added after every row is done (and only when no row held
// NaN, so a refused call leaves them untouched).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/topk_rank_checks.h"

namespace nbretr {
namespace {

// Target entries: -1 (padding) or a column in [0, G); at least one column per row.
// Checked row by row, first offence first, as the Python wrapper does.
void check_targets(const at::Tensor& t, int64_t G) {
  const int64_t R = t.size(0), T = t.size(1);
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    bool any = false;
    for (int64_t c = 0; c < T; ++c) {
      const int64_t v = p[r * T + c];
      NBRETR_CHECK_ARG(v >= -1 && v < G, "topk_rank", "targets[", r, ", ", c, "] = ", v,
                       " is outside [-1, G=", G, ") (-1 marks padding)");
      any = any || v >= 0;
    }
    NBRETR_CHECK_ARG(any, "topk_rank", "targets row ", r, " has no target (every entry is -1)");
  }
}

template <typename scalar_t>
void topk_rank_rows(const at::Tensor& s, const at::Tensor* targets, int64_t k, at::Tensor& values,
                    at::Tensor& indices, at::Tensor& ranks, std::atomic<bool>& saw_nan) {
  // exact for every supported dtype: half/bfloat16 widen to float without rounding
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const int64_t R = s.size(0), G = s.size(1);
  const scalar_t* sp = s.data_ptr<scalar_t>();
  scalar_t* vp = values.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  int64_t* rp = targets ? ranks.data_ptr<int64_t>() : nullptr;
  const int64_t* tp = targets ? targets->data_ptr<int64_t>() : nullptr;
  const int64_t T = targets ? targets->size(1) : 0;
  // about 1M scores per task: a smaller block is not worth waking a second thread for
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(G, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    // a heap of (value, index) ordered by `better`, so its front is the worst entry kept
    std::vector<std::pair<acc_t, int64_t>> heap;
    heap.reserve(static_cast<size_t>(k));
    auto better = [](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = sp + r * G;
      // the best target: highest score, equal scores by lower index
      acc_t bv = 0;
      int64_t bi = -1;
      for (int64_t c = 0; c < T; ++c) {
        const int64_t j = tp[r * T + c];
        if (j < 0) continue;
        const acc_t v = static_cast<acc_t>(row[j]);
        if (bi < 0 || v > bv || (v == bv && j < bi)) {
          bv = v;
          bi = j;
        }
      }
      // pass 1 (branch-free, vectorisable): NaN and the items ordered before the target
      int64_t before = 0, nans = 0;
      if (rp) {  // before the target an equal score counts, from the target on only a higher one
        for (int64_t j = 0; j < bi; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          nans += v != v;
          before += v >= bv;
        }
        for (int64_t j = bi; j < G; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          nans += v != v;
          before += v > bv;
        }
      } else {
        for (int64_t j = 0; j < G; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          nans += v != v;
        }
      }
      if (nans) {
        saw_nan.store(true, std::memory_order_relaxed);
        continue;
      }
      if (rp) rp[r] = before + 1;
      if (k == 0) continue;
      // pass 2: the top-k in column order, so an equal score never displaces a kept one:
      // the first k columns fill the heap, every later one must beat its worst (front)
      heap.clear();
      for (int64_t j = 0; j < k; ++j) heap.emplace_back(static_cast<acc_t>(row[j]), j);
      std::make_heap(heap.begin(), heap.end(), better);
      acc_t worst = heap.front().first;
      for (int64_t j = k; j < G; ++j) {
        const acc_t v = static_cast<acc_t>(row[j]);
        if (v > worst) {
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = {v, j};
          std::push_heap(heap.begin(), heap.end(), better);
          worst = heap.front().first;
        }
      }
      std::sort_heap(heap.begin(), heap.end(), better);  // best first
      for (int64_t c = 0; c < k; ++c) {
        vp[r * k + c] = static_cast<scalar_t>(heap[c].first);
        ip[r * k + c] = heap[c].second;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_rank_cpu(const at::Tensor& scores,
                                                             const c10::optional<at::Tensor>& targets, int64_t k,
                                                             at::Tensor& counts) {
  check_topk_rank_args(scores, targets, k, counts, c10::DeviceType::CPU);
  const bool has_t = targets.has_value() && targets->defined();
  const int64_t R = scores.size(0), G = scores.size(1);
  at::Tensor t;
  if (has_t) {
    t = targets->contiguous();
    check_targets(t, G);
  }
  at::Tensor values = at::empty({R, k}, scores.options());
  at::Tensor indices = at::empty({R, k}, scores.options().dtype(at::kLong));
  at::Tensor ranks = at::empty({has_t ? R : 0}, scores.options().dtype(at::kLong));
  if (R == 0) return {values, indices, ranks};
  const at::Tensor s = scores.contiguous();
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "topk_rank_cpu", [&] {
    topk_rank_rows<scalar_t>(s, has_t ? &t : nullptr, k, values, indices, ranks, saw_nan);
  });
  NBRETR_CHECK_ARG(!saw_nan.load(), "topk_rank", "scores contain NaN values; ranks need ordered scores");
  if (k > 0) {
    int64_t* cp = counts.data_ptr<int64_t>();
    const int64_t* ip = indices.data_ptr<int64_t>();
    for (int64_t i = 0, n = R * k; i < n; ++i) ++cp[ip[i]];
  }
  return {values, indices, ranks};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) { m.impl("topk_rank", &topk_rank_cpu); }

}  // namespace nbretr
