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

// The first j in [j0, n) with row[j] > thr, or n: the filter that almost every similarity
// fails once a row's list is full. GCC leaves the plain loop scalar (one compare and
// branch per element), so on x86-64 it is written with SSE2 (always there) and AVX2
// (picked at run time, csrc/common/cpu_isa.h) compares: 16 values and one movemask per step.
inline int64_t first_above_tail(const float* __restrict row, int64_t j, int64_t n, float thr) {
  for (; j < n; ++j) {
    if (row[j] > thr) return j;
  }
  return n;
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) inline int64_t first_above_avx2(const float* __restrict row, int64_t j, int64_t n,
                                                                 float thr) {
  const __m256 t = _mm256_set1_ps(thr);
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(row + j), t, _CMP_GT_OQ);
    const __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 8), t, _CMP_GT_OQ);
    if (_mm256_movemask_ps(_mm256_or_ps(a, b))) break;
  }
  return first_above_tail(row, j, n, thr);
}
inline int64_t first_above_sse2(const float* __restrict row, int64_t j, int64_t n, float thr) {
  const __m128 t = _mm_set1_ps(thr);
  for (; j + 16 <= n; j += 16) {
    const __m128 a = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j), t), _mm_cmpgt_ps(_mm_loadu_ps(row + j + 4), t));
    const __m128 b = _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + j + 8), t), _mm_cmpgt_ps(_mm_loadu_ps(row + j + 12), t));
    if (_mm_movemask_ps(_mm_or_ps(a, b))) break;
  }
  return first_above_tail(row, j, n, thr);
}
inline int64_t first_above(const float* __restrict row, int64_t j, int64_t n, float thr) {
  return cpu_isa_level() >= 1 ? first_above_avx2(row, j, n, thr) : first_above_sse2(row, j, n, thr);
}
#else
inline int64_t first_above(const float* __restrict row, int64_t j, int64_t n, float thr) {
  return first_above_tail(row, j, n, thr);
}
#endif

struct TopkCpuTiling {
  int64_t q_chunk = 1024;  // query rows per chunk (running lists for these rows stay live)
  int64_t g_tile = 2048;   // gallery columns per tile
};

namespace detail {

constexpr int64_t kRowBlock = 32;  // rows per deterministic partial-sum block

// A candidate of one tile row packed into one sortable word: larger key = better.
// High half: the value's bits mapped to an order-preserving unsigned integer (-0.0 is
// canonicalised to +0.0 first, as the two compare equal); low half: ~(tile column), so
// equal values rank the lower column (= lower gallery index) first: topk_better's order.
inline uint64_t pack_candidate(float v, int64_t col) {
  v = v + 0.0f;  // -0.0 -> +0.0
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(col));
}

inline void unpack_candidate(uint64_t key, int64_t g0, float* v, int64_t* i) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
  std::memcpy(v, &b, sizeof b);
  *i = g0 + static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

constexpr int kFolds = 256;  // first_tile_select's columns

// Per-thread scratch for merge_tile_row.
struct RowScratch {
  std::vector<uint64_t> buf;  // packed candidates since the last flush (capacity cap)
  std::vector<float> mv, ov, fold;  // fold: first_tile_select's column maxima
  std::vector<int64_t> mi, oi;
  int cap = 0;
  explicit RowScratch(int k) : cap(std::max(2 * k, 32)) {
    buf.reserve(cap);
    mv.resize(k);
    mi.resize(k);
    ov.resize(k);
    oi.resize(k);
    fold.resize(kFolds);
  }
};

// Sorts the buffered candidates (all from one tile row starting at gallery index g0),
// keeps the best min(n, k) and merges them into the list.
inline void flush_candidates(float* vals, int64_t* idx, int* n, int k, int64_t g0, RowScratch& s) {
  auto& buf = s.buf;
  if (buf.empty()) return;
  const auto desc = std::greater<uint64_t>();
  const int m = static_cast<int>(std::min<size_t>(buf.size(), static_cast<size_t>(k)));
  if (static_cast<size_t>(m) < buf.size()) std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.end(), desc);
  std::sort(buf.begin(), buf.begin() + m, desc);
  for (int c = 0; c < m; ++c) unpack_candidate(buf[c], g0, &s.mv[c], &s.mi[c]);
  const int out = topk_merge(vals, idx, *n, s.mv.data(), s.mi.data(), m, s.ov.data(), s.oi.data(), k);
  std::memcpy(vals, s.ov.data(), sizeof(float) * out);
  std::memcpy(idx, s.oi.data(), sizeof(int64_t) * out);
  *n = out;
  buf.clear();
}

constexpr int kDirectInsertMaxK = 256;

// The place of a new value v in a descending list of k values: the number of entries
// >= v (the new entry goes below its equals, since its index exceeds every listed index).
// A branch-free count (a binary search over random values mispredicts at every step);
// AVX-512 / AVX2 compares where the CPU has them (csrc/common/cpu_isa.h).
inline int count_at_least_scalar(const float* vals, int k, float v) {
  int c = 0;
  for (int e = 0; e < k; ++e) c += vals[e] >= v;
  return c;
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) inline int count_at_least_avx512(const float* vals, int k, float v) {
  const __m512 t = _mm512_set1_ps(v);
  int c = 0, e = 0;
  for (; e + 16 <= k; e += 16) c += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(vals + e), t, _CMP_GE_OQ));
  if (e < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - e)) - 1);
    c += __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, vals + e), t, _CMP_GE_OQ));
  }
  return c;
}
__attribute__((target("avx2"))) inline int count_at_least_avx2(const float* vals, int k, float v) {
  const __m256 t = _mm256_set1_ps(v);
  int c = 0, e = 0;
  for (; e + 8 <= k; e += 8) c += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(vals + e), t, _CMP_GE_OQ)));
  return c + count_at_least_scalar(vals + e, k - e, v);
}
inline int count_at_least(const float* vals, int k, float v) {
  const int isa = cpu_isa_level();
  return isa >= 2 ? count_at_least_avx512(vals, k, v) : isa == 1 ? count_at_least_avx2(vals, k, v)
                                                                  : count_at_least_scalar(vals, k, v);
}
#else
inline int count_at_least(const float* vals, int k, float v) { return count_at_least_scalar(vals, k, v); }
#endif

// Puts (v, i) into a full descending list of k entries whose last value is below v,
// dropping the last.
inline void insert_full(float* vals, int64_t* idx, int k, float v, int64_t i) {
  const int at = count_at_least(vals, k, v);
  std::memmove(vals + at + 1, vals + at, sizeof(float) * (k - 1 - at));
  std::memmove(idx + at + 1, idx + at, sizeof(int64_t) * (k - 1 - at));
  vals[at] = v;
  idx[at] = i;
}

// A row's first tile, when it is wide (gn >= kFirstTileMin) and k small (k < 128): its
// top k at once, instead of ~k ln(gn / k) insertions under a threshold that starts low.
// The tile row is folded into kFolds column maxima (each element in one column); the
// (k+1)-th largest maximum T bounds the k-th best candidate from below (k maxima other
// than the own item's, if that is a maximum, are distinct candidates >= T), so the
// candidates >= T (about k of them on random data) hold the top k: they are buffered
// and selected exactly by flush_candidates (tie rule and all).
constexpr int64_t kFirstTileMin = 4 * kFolds;

inline bool first_tile_select(const float* row, int64_t gn, int64_t g0, int64_t self_col, float* vals,
                              int64_t* idx, int* n, int k, RowScratch& s) {
  if (*n != 0 || gn < kFirstTileMin || k >= kFolds / 2) return false;
  float* mx = s.fold.data();
  std::copy(row, row + kFolds, mx);
  for (int64_t j0 = kFolds; j0 < gn; j0 += kFolds) {
    const float* r = row + j0;
    const int64_t w = std::min<int64_t>(kFolds, gn - j0);
    for (int64_t c = 0; c < w; ++c) mx[c] = r[c] > mx[c] ? r[c] : mx[c];
  }
  std::nth_element(mx, mx + k, mx + kFolds, std::greater<float>());  // mx[k]: the (k+1)-th largest
  // candidates >= T, as first_above's strict compare against the float just below T
  const float below = std::nextafter(mx[k], -std::numeric_limits<float>::infinity());
  for (int64_t j = first_above(row, 0, gn, below); j < gn; j = first_above(row, j + 1, gn, below))
    if (j != self_col) s.buf.push_back(pack_candidate(row[j], j));
  flush_candidates(vals, idx, n, k, g0, s);
  return true;
}

// Merges one tile row (gn similarities of gallery items g0..) into the running list
// (vals/idx, *n entries, capacity k). Every tile index exceeds every index already in
// the list (tiles arrive in gallery order), so once the list is full a candidate can
// enter iff its value is strictly greater than the k-th value: one compare per element.
// For k <= kDirectInsertMaxK a candidate passing it is inserted in place at once;
// for larger k candidates are buffered and merged max(2k, 32) at a time (select + sort +
// merge). Either way the threshold rises; a row costs O(gn + k log k · log(gn / k)).
inline void merge_tile_row(const float* row, int64_t gn, int64_t g0, int64_t self_col, float* vals,
                           int64_t* idx, int* n, int k, RowScratch& s) {
  if (first_tile_select(row, gn, g0, self_col, vals, idx, n, k, s)) return;
  auto& buf = s.buf;
  const size_t cap = static_cast<size_t>(s.cap);
  int64_t j = 0;
  for (; *n < k && j < gn; ++j) {  // not full yet: every candidate qualifies
    if (j == self_col) continue;
    buf.push_back(pack_candidate(row[j], j));
    if (buf.size() == cap) flush_candidates(vals, idx, n, k, g0, s);
  }
  if (*n == k) {  // full (and buf empty): filter by the k-th value
    const bool direct = k <= kDirectInsertMaxK;
    float thr = vals[k - 1];
    for (j = first_above(row, j, gn, thr); j < gn; j = first_above(row, j + 1, gn, thr)) {
      if (j == self_col) continue;
      if (direct) {
        insert_full(vals, idx, k, row[j] + 0.0f, g0 + j);  // -0.0 stored as +0.0, as pack_candidate does
      } else {
        buf.push_back(pack_candidate(row[j], j));
        if (buf.size() < cap) continue;
        flush_candidates(vals, idx, n, k, g0, s);
      }
      thr = vals[k - 1];
    }
  }
  flush_candidates(vals, idx, n, k, g0, s);
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
  const int kk = static_cast<int>(k);
  auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor tile_buf = at::empty({qc * gt}, fopts);
  const int64_t max_blocks = (qc + detail::kRowBlock - 1) / detail::kRowBlock;
  at::Tensor partial = at::empty({max_blocks, gt}, at::TensorOptions().dtype(at::kDouble));
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
    for (int64_t g0 = 0; g0 < G; g0 += gt) {
      const int64_t gn = std::min(gt, G - g0);
      at::Tensor tile = tile_buf.narrow(0, 0, qn * gn).view({qn, gn});
      tile_fn(q0, qn, g0, gn, tile);
      const float* tp = tile.const_data_ptr<float>();
      at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
        detail::RowScratch scratch(kk);
        for (int64_t b = b0; b < b1; ++b) {
          double* part = partial_p + b * gn;
          std::fill(part, part + gn, 0.0);
          const int64_t r_end = std::min(qn, (b + 1) * detail::kRowBlock);
          for (int64_t r = b * detail::kRowBlock; r < r_end; ++r) {
            const float* row = tp + r * gn;
            const int64_t grow = q0 + r;  // query row within this call
            const int64_t self_col = exclude_self ? grow + q_offset - g0 : -1;
            const bool has_self = self_col >= 0 && self_col < gn;
            const int64_t skip = has_self ? self_col : gn;  // the own item adds nothing
            accumulate_row(row, part, skip);
            if (skip < gn) accumulate_row(row + skip + 1, part + skip + 1, gn - skip - 1);
            detail::merge_tile_row(row, gn, g0, has_self ? self_col : -1, vals_all + grow * k, idx_all + grow * k,
                                   &lens[r], kk, scratch);
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
    const int64_t* ip = idx_all + q0 * k;
    for (int64_t e = 0; e < qn * k; ++e) counts_p[ip[e]] += 1;
  }
}

}  // namespace nbretr
