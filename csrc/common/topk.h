// Top-k lists with nbretr's tie rule for the kernels of topk_centrality (docs/operators.md).
// The CUDA kernel orders candidates with topk_better and topk_bitonic_step; the
// CPU kernel packs the same order into integer keys (csrc/cpu/topk_engine.h) and merges
// lists with topk_merge (which the CPU tests run through topk_better).
//
// A top-k list is a pair of arrays (vals[0..n), idx[0..n)) kept sorted "best first":
// descending value, equal values by ascending gallery index. Inputs are finite (the ops
// refuse NaN/Inf before any kernel runs), so `>` and `==` define a strict total order on
// (value, index) pairs with distinct indices.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace nbretr {

// the largest k every backend accepts (one error at the same bound everywhere)
constexpr int64_t kTopkMaxK = 1024;

// true when (v1, i1) ranks before (v2, i2)
NBRETR_HD bool topk_better(float v1, int64_t i1, float v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// Merges two sorted lists (a: na entries, b: nb entries, no index in both) into out
// (capacity k, must not alias a or b). Returns the output length min(na + nb, k).
NBRETR_HD int topk_merge(const float* av, const int64_t* ai, int na, const float* bv, const int64_t* bi,
                         int nb, float* ov, int64_t* oi, int k) {
  int x = 0, y = 0, n = 0;
  while (n < k && (x < na || y < nb)) {
    const bool take_a = y >= nb || (x < na && topk_better(av[x], ai[x], bv[y], bi[y]));
    if (take_a) {
      ov[n] = av[x];
      oi[n] = ai[x];
      ++x;
    } else {
      ov[n] = bv[y];
      oi[n] = bi[y];
      ++y;
    }
    ++n;
  }
  return n;
}

// One compare-exchange of a bitonic sort into best-first order over n = 2^m entries:
// element i against i ^ stride inside blocks of `size`. The caller runs it for
// size = 2, 4, ..., n and stride = size/2, ..., 1, for every i with (i ^ stride) > i.
NBRETR_HD void topk_bitonic_step(float* vals, int64_t* idx, int i, int size, int stride) {
  const int j = i ^ stride;
  const bool best_first = (i & size) == 0;
  const bool swap = best_first ? topk_better(vals[j], idx[j], vals[i], idx[i])
                               : topk_better(vals[i], idx[i], vals[j], idx[j]);
  if (swap) {
    const float tv = vals[i];
    const int64_t ti = idx[i];
    vals[i] = vals[j];
    idx[i] = idx[j];
    vals[j] = tv;
    idx[j] = ti;
  }
}

// sentinel entries that lose against every real candidate
constexpr int64_t kTopkNoIndex = INT64_MAX;

}  // namespace nbretr
