// topk_centrality on the CPU, independent of how a similarity tile is computed.
//
// The driver streams query chunks x gallery tiles. A tile function fills an fp32 tile
// [qn, gn] (row-major, row stride gn) with the similarities of queries q0..q0+qn-1 to
// gallery items g0..g0+gn-1; sim="dot" passes a matrix product (csrc/cpu/topk_centrality.cpp),
// sim="wti" can pass its token-wise similarity. The driver then merges the tile into each
// row's running top-k (csrc/common/topk.h, shared with CUDA), adds the column sums in
// fp64, and after the last tile of a chunk counts the chunk's final top-k indices.
//
// Determinism: sums are accumulated per fixed block of kRowBlock rows (rows in order),
// then the blocks are reduced in order, so the result does not depend on the thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/topk.h"

namespace nbretr {

// part[j] += row[j] in fp64 (an AVX2 clone is picked at load time where the CPU has it).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
inline void accumulate_row(const float* __restrict row, double* __restrict part, int64_t n) {
  for (int64_t j = 0; j < n; ++j) part[j] += static_cast<double>(row[j]);
}

// Masks of the values above a threshold, 16 columns at a time: the filter that almost
// every similarity fails once a row's list is full. GCC leaves a plain compare loop scalar
// (one compare and branch per element), so on x86-64 it is written with SSE2 (always
// there), AVX2 and AVX-512 compares (picked at run time, csrc/common/cpu_isa.h).
//
// block_mask(p, w, thr): bit c set iff p[c] > thr, for c < w <= 16.
// next_hit(row, j, n, thr, &mask): the first j' >= j, stepping by 16, whose block
// [j', min(j' + 16, n)) holds a value > thr, with that block's mask; n when none does.
inline uint32_t block_mask_scalar(const float* p, int64_t w, float thr) {
  uint32_t m = 0;
  for (int64_t c = 0; c < w; ++c) m |= static_cast<uint32_t>(p[c] > thr) << c;
  return m;
}
inline int64_t next_hit_tail(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  for (; j < n; j += 16) {
    const uint32_t m = block_mask_scalar(row + j, std::min<int64_t>(16, n - j), thr);
    if (m) {
      *mask = m;
      return j;
    }
  }
  return n;
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) inline uint32_t block_mask_avx512(const float* p, float thr) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(thr), _CMP_GT_OQ);
}
__attribute__((target("avx512f"))) inline int64_t next_hit_avx512(const float* row, int64_t j, int64_t n, float thr,
                                                                  uint32_t* mask) {
  const __m512 t = _mm512_set1_ps(thr);
  for (; j + 16 <= n; j += 16) {
    const uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), t, _CMP_GT_OQ);
    if (m) {
      *mask = m;
      return j;
    }
  }
  return next_hit_tail(row, j, n, thr, mask);
}
__attribute__((target("avx2"))) inline uint32_t block_mask_avx2(const float* p, float thr) {
  const __m256 t = _mm256_set1_ps(thr);
  const uint32_t a = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), t, _CMP_GT_OQ));
  const uint32_t b = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), t, _CMP_GT_OQ));
  return a | (b << 8);
}
__attribute__((target("avx2"))) inline int64_t next_hit_avx2(const float* row, int64_t j, int64_t n, float thr,
                                                              uint32_t* mask) {
  const __m256 t = _mm256_set1_ps(thr);
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(row + j), t, _CMP_GT_OQ);
    const __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 8), t, _CMP_GT_OQ);
    if (_mm256_movemask_ps(_mm256_or_ps(a, b))) {
      *mask = static_cast<uint32_t>(_mm256_movemask_ps(a)) | (static_cast<uint32_t>(_mm256_movemask_ps(b)) << 8);
      return j;
    }
  }
  return next_hit_tail(row, j, n, thr, mask);
}
inline uint32_t block_mask_sse2(const float* p, float thr) {
  const __m128 t = _mm_set1_ps(thr);
  uint32_t m = 0;
  for (int c = 0; c < 4; ++c) m |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(p + 4 * c), t))) << (4 * c);
  return m;
}
inline int64_t next_hit_sse2(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  const __m128 t = _mm_set1_ps(thr);
  for (; j + 16 <= n; j += 16) {
    const __m128 a = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j), t), _mm_cmpgt_ps(_mm_loadu_ps(row + j + 4), t));
    const __m128 b = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j + 8), t), _mm_cmpgt_ps(_mm_loadu_ps(row + j + 12), t));
    if (_mm_movemask_ps(_mm_or_ps(a, b))) {
      *mask = block_mask_sse2(row + j, thr);
      return j;
    }
  }
  return next_hit_tail(row, j, n, thr, mask);
}
inline uint32_t block_mask(const float* p, int64_t w, float thr) {
  if (w < 16) return block_mask_scalar(p, w, thr);
  const int isa = cpu_isa_level();
  return isa >= 2 ? block_mask_avx512(p, thr) : isa == 1 ? block_mask_avx2(p, thr) : block_mask_sse2(p, thr);
}
inline int64_t next_hit(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  const int isa = cpu_isa_level();
  return isa >= 2 ? next_hit_avx512(row, j, n, thr, mask) : isa == 1 ? next_hit_avx2(row, j, n, thr, mask)
                                                                      : next_hit_sse2(row, j, n, thr, mask);
}
#else
inline uint32_t block_mask(const float* p, int64_t w, float thr) { return block_mask_scalar(p, w, thr); }
inline int64_t next_hit(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  return next_hit_tail(row, j, n, thr, mask);
}
#endif

struct TopkCpuTiling {
  int64_t q_chunk = 1024;  // query rows per chunk (their candidate reservoirs stay live)
  int64_t g_tile = 2048;   // gallery columns per tile
  // gallery items per epoch: a candidate's column within its epoch is packed into 32 bits
  // (detail::pack_candidate); each epoch's top k is merged into the running list
  int64_t epoch = 0xFFFFFFFFLL;
};

namespace detail {

constexpr int64_t kRowBlock = 32;  // rows per deterministic partial-sum block

// A candidate packed into one sortable word: larger key = better. High half: the value's
// bits mapped to an order-preserving unsigned integer (-0.0 is canonicalised to +0.0
// first, as the two compare equal); low half: ~(column within the epoch), so equal values
// rank the lower column (= lower gallery index) first: topk_better's order.
inline uint64_t pack_candidate(float v, int64_t col) {
  v = v + 0.0f;  // -0.0 -> +0.0
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(col));
}

inline float candidate_value(uint64_t key) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline int64_t candidate_column(uint64_t key) { return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

// Reorders a[0..n) so that a[kth] is the (kth+1)-th largest, a[0..kth) >= a[kth] >=
// a[kth+1..n) (std::nth_element with std::greater). A quickselect whose partition is
// branch-free (every element is written to both ends of `tmp`, n entries, and the
// compare moves one cursor), since on random keys std::nth_element's partition
// mispredicts about every other element. Three-way, so runs of equal values end it; a
// range that shrinks too slowly (adversarial pivots) is handed to std::nth_element.
template <class T>
inline void select_desc(T* a, int n, int kth, T* tmp) {
  int lo = 0, hi = n, rounds = 0;
  while (hi - lo > 16) {
    if (++rounds > 40) {
      std::nth_element(a + lo, a + kth, a + hi, std::greater<T>());
      return;
    }
    T x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];  // median of three
    if (x < y) std::swap(x, y);
    if (y < z) y = z < x ? z : x;
    const T p = y;
    int g = 0, l = hi - lo;  // tmp[0, g): > p, tmp[l, hi - lo): < p
    for (int i = lo; i < hi; ++i) {
      const T v = a[i];
      tmp[g] = v;
      tmp[l - 1] = v;
      g += v > p;
      l -= v < p;
    }
    std::fill(tmp + g, tmp + l, p);
    std::memcpy(a + lo, tmp, sizeof(T) * (hi - lo));
    if (kth < lo + g) {
      hi = lo + g;
    } else if (kth >= lo + l) {
      lo += l;
    } else {
      return;  // a[kth] == p, in the middle run
    }
  }
  std::nth_element(a + lo, a + kth, a + hi, std::greater<T>());
}

// A query row's candidates in the current epoch: an unsorted reservoir of packed keys
// (capacity cap > k). Once it has held k or more it is "full": it keeps exactly the best
// k, `thr` is the k-th best value, and a later column enters iff its value is strictly
// greater (its index exceeds every held index, so an equal value ranks below). Entries
// are appended; when the reservoir reaches cap it is cut back to the best k (one
// nth_element, O(cap)) and thr rises. Sorting waits for the epoch's end: O(k log k) once
// per row instead of per insertion or per tile.
struct Reservoir {
  uint64_t* keys;
  int n;
  bool full;
  float thr;
};

inline void cut_to_k(Reservoir& r, int k, uint64_t* tmp) {
  select_desc(r.keys, r.n, k - 1, tmp);
  r.n = k;
  r.full = true;
  r.thr = candidate_value(r.keys[k - 1]);
}

constexpr int kFolds = 256;  // first_tile_bound's columns
constexpr int64_t kFirstTileMin = 4 * kFolds;

// A row's first tile, when it is wide (gn >= kFirstTileMin) and k small (k < 128): a lower
// bound T on its k-th best candidate, so that only the candidates >= T (about k of them on
// random data) enter the reservoir, instead of every column until it first fills. The tile
// row is folded into kFolds column maxima (each element in one column); the (k+1)-th
// largest maximum bounds the k-th best candidate from below (k maxima other than the own
// item's, if that is a maximum, are distinct candidates >= T). The caller checks it all
// the same: k or more candidates >= T prove that the top k are among them. Returns false
// (no bound) when the tile is narrow, k large, or T is -inf.
inline bool first_tile_bound(const float* row, int64_t gn, int k, float* fold, float* T) {
  if (gn < kFirstTileMin || k >= kFolds / 2) return false;
  std::copy(row, row + kFolds, fold);
  for (int64_t j0 = kFolds; j0 < gn; j0 += kFolds) {
    const float* r = row + j0;
    const int64_t w = std::min<int64_t>(kFolds, gn - j0);
    for (int64_t c = 0; c < w; ++c) fold[c] = r[c] > fold[c] ? r[c] : fold[c];
  }
  float tmp[kFolds];
  select_desc(fold, kFolds, k, tmp);  // fold[k]: the (k+1)-th largest
  *T = fold[k];
  return *T > -std::numeric_limits<float>::infinity();
}

// Appends the columns j >= j0 of a tile row whose value exceeds the reservoir's threshold
// (or `start`, a lower threshold, while it is not full), cutting back whenever it fills.
// `col0`: the tile's first column within the epoch; `self_col`: the tile column of the
// query's own item (-1: none).
inline void scan_into(const float* row, int64_t j, int64_t gn, int64_t col0, int64_t self_col, float start,
                      Reservoir& r, int k, int cap, uint64_t* tmp) {
  float thr = r.full ? r.thr : start;
  uint32_t m = 0;
  for (j = next_hit(row, j, gn, thr, &m); j < gn; j = next_hit(row, j + 16, gn, thr, &m)) {
    while (m) {
      const int64_t c = j + __builtin_ctz(m);
      m &= m - 1;
      if (c == self_col) continue;
      r.keys[r.n++] = pack_candidate(row[c], col0 + c);
      if (r.n < cap) continue;
      cut_to_k(r, k, tmp);
      thr = r.thr;
      m &= block_mask(row + j, std::min<int64_t>(16, gn - j), thr);
    }
  }
}

// Adds one tile row (gn similarities, columns col0.. of the epoch) to the row's reservoir.
// tmp: cap entries of scratch.
inline void merge_tile_row(const float* row, int64_t gn, int64_t col0, int64_t self_col, Reservoir& r, int k,
                           int cap, float* fold, uint64_t* tmp) {
  int64_t j = 0;
  if (!r.full) {
    float T;
    if (r.n == 0 && first_tile_bound(row, gn, k, fold, &T)) {
      // the candidates >= T, as a strict compare against the float just below T
      scan_into(row, 0, gn, col0, self_col, std::nextafter(T, -std::numeric_limits<float>::infinity()), r, k, cap, tmp);
      if (r.full) return;
      if (r.n >= k) {  // the bound's guarantee
        cut_to_k(r, k, tmp);
        return;
      }
      r.n = 0;  // fewer: not reached (see first_tile_bound); the plain pass below stays exact
    }
    for (; j < gn && !r.full; ++j) {  // not full yet: every candidate qualifies
      if (j == self_col) continue;
      r.keys[r.n++] = pack_candidate(row[j], col0 + j);
      if (r.n == cap) cut_to_k(r, k, tmp);
    }
    if (!r.full) {
      if (r.n >= k) cut_to_k(r, k, tmp);  // the filter starts with the next tile
      return;
    }
  }
  scan_into(row, j, gn, col0, self_col, r.thr, r, k, cap, tmp);
}

// The epoch's best min(n, k) candidates of a row, sorted, merged into its running list
// (vals/idx, *len entries; gallery indices = base + column). tv/ti/ov/oi: scratch, ti of
// cap entries, the others of k.
inline void finish_epoch_row(Reservoir& r, int k, int64_t base, float* vals, int64_t* idx, int* len, float* tv,
                             int64_t* ti, float* ov, int64_t* oi) {
  const int m = std::min(r.n, k);
  if (r.n > k) select_desc(r.keys, r.n, k - 1, reinterpret_cast<uint64_t*>(ti));
  std::sort(r.keys, r.keys + m, std::greater<uint64_t>());
  if (*len == 0) {  // the first epoch (all of them, unless G > 2^32 - 1)
    for (int c = 0; c < m; ++c) {
      vals[c] = candidate_value(r.keys[c]);
      idx[c] = base + candidate_column(r.keys[c]);
    }
    *len = m;
  } else {
    for (int c = 0; c < m; ++c) {
      tv[c] = candidate_value(r.keys[c]);
      ti[c] = base + candidate_column(r.keys[c]);
    }
    const int out = topk_merge(vals, idx, *len, tv, ti, m, ov, oi, k);
    std::memcpy(vals, ov, sizeof(float) * out);
    std::memcpy(idx, oi, sizeof(int64_t) * out);
    *len = out;
  }
  r.n = 0;
  r.full = false;
}

}  // namespace detail

// values [Q, k] fp32 and indices [Q, k] int64 (written), counts [G] int64 and sums [G] fp64
// (accumulated into). Arguments already checked (k <= number of candidates per row).
// tile_fn(q0, qn, g0, gn, out) writes the fp32 tile into `out` ([qn, gn], contiguous).
template <class TileFn>
void topk_centrality_cpu_run(int64_t Q, int64_t G, int64_t k, bool exclude_self, int64_t q_offset,
                             TileFn&& tile_fn, at::Tensor& values, at::Tensor& indices, at::Tensor& counts,
                             at::Tensor& sums, TopkCpuTiling tiling = {}) {
  if (Q == 0) return;
  const int64_t qc = std::max<int64_t>(1, std::min(tiling.q_chunk, Q));
  const int64_t gt = std::max<int64_t>(1, std::min(tiling.g_tile, G));
  const int64_t epoch = std::max<int64_t>(1, std::min<int64_t>(tiling.epoch, 0xFFFFFFFFLL));
  const int kk = static_cast<int>(k);
  const int cap = std::max(2 * kk, kk + 16);
  auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor tile_buf = at::empty({qc * gt}, fopts);
  const int64_t max_blocks = (qc + detail::kRowBlock - 1) / detail::kRowBlock;
  at::Tensor partial = at::empty({max_blocks, gt}, at::TensorOptions().dtype(at::kDouble));
  std::vector<uint64_t> keys(static_cast<size_t>(qc) * cap);
  std::vector<detail::Reservoir> res(qc);
  for (int64_t r = 0; r < qc; ++r) res[r].keys = keys.data() + r * cap;
  std::vector<int> lens(qc);
  float* vals_all = values.data_ptr<float>();
  int64_t* idx_all = indices.data_ptr<int64_t>();
  int64_t* counts_p = counts.data_ptr<int64_t>();
  double* sums_p = sums.data_ptr<double>();
  double* partial_p = partial.data_ptr<double>();

  for (int64_t q0 = 0; q0 < Q; q0 += qc) {
    const int64_t qn = std::min(qc, Q - q0);
    const int64_t nblk = (qn + detail::kRowBlock - 1) / detail::kRowBlock;
    std::fill(lens.begin(), lens.end(), 0);
    for (auto& r : res) r.n = 0, r.full = false;
    for (int64_t base = 0; base < G; base += epoch) {
      const int64_t e_end = std::min(G, base + epoch);
      for (int64_t g0 = base; g0 < e_end; g0 += gt) {
        const int64_t gn = std::min(gt, e_end - g0);
        at::Tensor tile = tile_buf.narrow(0, 0, qn * gn).view({qn, gn});
        tile_fn(q0, qn, g0, gn, tile);
        const float* tp = tile.const_data_ptr<float>();
        at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
          float fold[detail::kFolds];
          std::vector<uint64_t> tmp(cap);
          for (int64_t b = b0; b < b1; ++b) {
            double* part = partial_p + b * gn;
            std::fill(part, part + gn, 0.0);
            const int64_t r_end = std::min(qn, (b + 1) * detail::kRowBlock);
            for (int64_t r = b * detail::kRowBlock; r < r_end; ++r) {
              const float* row = tp + r * gn;
              const int64_t self_col = exclude_self ? q0 + r + q_offset - g0 : -1;
              const bool has_self = self_col >= 0 && self_col < gn;
              const int64_t skip = has_self ? self_col : gn;  // the own item adds nothing
              accumulate_row(row, part, skip);
              if (skip < gn) accumulate_row(row + skip + 1, part + skip + 1, gn - skip - 1);
              detail::merge_tile_row(row, gn, g0 - base, has_self ? self_col : -1, res[r], kk, cap, fold, tmp.data());
            }
          }
        });
        // reduce the blocks in order (fixed partition: deterministic)
        at::parallel_for(0, gn, 256, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            double s = 0.0;
            for (int64_t b = 0; b < nblk; ++b) s += partial_p[b * gn + j];
            sums_p[g0 + j] += s;
          }
        });
      }
      at::parallel_for(0, qn, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> tv(kk), ov(kk);
        std::vector<int64_t> ti(cap), oi(kk);
        for (int64_t r = r0; r < r1; ++r)
          detail::finish_epoch_row(res[r], kk, base, vals_all + (q0 + r) * k, idx_all + (q0 + r) * k, &lens[r],
                                   tv.data(), ti.data(), ov.data(), oi.data());
      });
    }
    const int64_t* ip = idx_all + q0 * k;
    for (int64_t e = 0; e < qn * k; ++e) counts_p[ip[e]] += 1;
  }
}

}  // namespace nbretr
