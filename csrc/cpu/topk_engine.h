// topk_centrality on the CPU, independent of how a similarity tile is computed.
//
// The driver streams query chunks x gallery tiles. A tile function fills an fp32 tile
// [qn, gn] (row-major, row stride gn) with the similarities of queries q0..q0+qn-1 to
// gallery items g0..g0+gn-1; sim="dot" passes a matrix product (csrc/cpu/topk_centrality.cpp).
// The driver adds every tile row to its query's candidate reservoir (below) and, after the
// last tile of a chunk, writes the chunk's sorted top-k lists (the tie rule of
// csrc/common/topk.h, shared with CUDA) and counts their indices. The similarity sums are
// the caller's: for sim="dot" they follow from linearity without the tiles.
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

#include "common/topk_tiles.h"

#include "common/cpu_isa.h"
#include "common/topk.h"

namespace nbretr {

// Masks of the values above a threshold, 16 columns at a time: the filter that almost
// every similarity fails once a row's list is full. GCC leaves a plain compare loop scalar
// (one compare and branch per element), so on x86-64 it is written with SSE2 (always
// there) and AVX2 compares (picked at run time, csrc/common/cpu_isa.h); the AVX-512 scan
// is detail::scan_into_avx512.
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
  return cpu_isa_level() >= 1 ? block_mask_avx2(p, thr) : block_mask_sse2(p, thr);
}
inline int64_t next_hit(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  return cpu_isa_level() >= 1 ? next_hit_avx2(row, j, n, thr, mask) : next_hit_sse2(row, j, n, thr, mask);
}
#else
inline uint32_t block_mask(const float* p, int64_t w, float thr) { return block_mask_scalar(p, w, thr); }
inline int64_t next_hit(const float* row, int64_t j, int64_t n, float thr, uint32_t* mask) {
  return next_hit_tail(row, j, n, thr, mask);
}
#endif

struct TopkCpuTiling {
  int64_t q_chunk = kTopkCpuQChunk;  // query rows per chunk (their candidate reservoirs stay live)
  int64_t g_tile = kTopkCpuGTile;    // gallery columns per tile
  // gallery items per epoch: a candidate's column within its epoch is packed into 32 bits
  // (detail::pack_candidate); each epoch's top k is merged into the running list
  int64_t epoch = 0xFFFFFFFFLL;
};

namespace detail {

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

// Sorts a[0..n) of distinct keys descending. Up to kRankSortMax keys on AVX-512/AVX2: by
// rank (a key's place = the number of keys above it: n^2 / 8 vector compares, no branch
// on the data; 3.5x std::sort at n = 100 measured here), else std::sort. tmp: n entries.
constexpr int kRankSortMax = 256;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) inline void rank_sort_desc_avx512(uint64_t* a, int n, uint64_t* tmp) {
  std::memcpy(tmp, a, sizeof(uint64_t) * n);
  const int full = n / 8;
  const __mmask8 rest = static_cast<__mmask8>((1u << (n - 8 * full)) - 1);
  for (int i = 0; i < n; ++i) {
    const __m512i x = _mm512_set1_epi64(static_cast<long long>(tmp[i]));
    int above = 0;
    for (int v = 0; v < full; ++v)
      above += __builtin_popcount(_mm512_cmpgt_epu64_mask(_mm512_loadu_si512(tmp + 8 * v), x));
    if (rest) above += __builtin_popcount(_mm512_mask_cmpgt_epu64_mask(rest, _mm512_maskz_loadu_epi64(rest, tmp + 8 * full), x));
    a[above] = tmp[i];
  }
}
__attribute__((target("avx2"))) inline void rank_sort_desc_avx2(uint64_t* a, int n, uint64_t* tmp) {
  // unsigned order as signed order of the keys with the top bit flipped
  const __m256i flip = _mm256_set1_epi64x(static_cast<long long>(0x8000000000000000ULL));
  std::memcpy(tmp, a, sizeof(uint64_t) * n);
  const int full = n / 4;
  for (int i = 0; i < n; ++i) {
    const __m256i x = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(tmp[i])), flip);
    int above = 0;
    for (int v = 0; v < full; ++v) {
      const __m256i y = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tmp + 4 * v)), flip);
      above += __builtin_popcount(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(y, x))));
    }
    for (int e = 4 * full; e < n; ++e) above += tmp[e] > tmp[i];
    a[above] = tmp[i];
  }
}
#endif
inline void sort_desc(uint64_t* a, int n, uint64_t* tmp) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const int isa = cpu_isa_level();
  if (n <= kRankSortMax && isa >= 1) {
    if (isa >= 2) {
      rank_sort_desc_avx512(a, n, tmp);
    } else {
      rank_sort_desc_avx2(a, n, tmp);
    }
    return;
  }
#endif
  (void)tmp;
  std::sort(a, a + n, std::greater<uint64_t>());
}

// A query row's candidates in the current epoch: an unsorted reservoir of packed keys
// (capacity cap > k). Once it has held k or more it is "full": it keeps exactly the best
// k, `thr` is the k-th best value, and a later column enters iff its value is strictly
// greater (its index exceeds every held index, so an equal value ranks below). Entries
// are appended; when the reservoir fills (reaches cap, or on AVX-512 would pass it) it is
// cut back to the best k (select_desc, O(cap)) and thr rises. Sorting waits for the
// epoch's end: once per row instead of per insertion or per tile.
constexpr int kReservoirSlack = 16;  // entries past cap that a vector store may write

struct Reservoir {
  uint64_t* keys = nullptr;
  int n = 0;
  bool full = false;
  float thr = 0.0f;
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The AVX-512 scan: a block of 16 with any value above the threshold is packed into keys
// in registers and appended by two compress-stores, instead of one key per set bit (a
// branch per candidate). The threshold rises by whole blocks. Stores write 8 keys at
// the end of the reservoir, hence its kReservoirSlack.
__attribute__((target("avx512f"))) inline void scan_into_avx512(const float* row, int64_t j, int64_t gn,
                                                                  int64_t col0, int64_t self_col, float start,
                                                                  Reservoir& r, int k, int cap, uint64_t* tmp) {
  float thr = r.full ? r.thr : start;
  uint64_t* const keys = r.keys;
  int n = r.n;
  __m512 t = _mm512_set1_ps(thr);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (; j < gn; j += 16) {
    const int64_t w = std::min<int64_t>(16, gn - j);
    const __mmask16 valid = static_cast<__mmask16>(w == 16 ? 0xFFFFu : (1u << w) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, row + j);
    uint32_t m = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GT_OQ);
    if (!m) continue;
    if (self_col >= j && self_col < j + 16) m &= ~(1u << (self_col - j));
    if (n + __builtin_popcount(m) > cap) {  // cut back first (n > k here, as cap >= k + 16)
      r.n = n;
      cut_to_k(r, k, tmp);
      n = r.n;
      thr = r.thr;
      t = _mm512_set1_ps(thr);
      m &= _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GT_OQ);
    }
    // pack_candidate on 16 lanes: value bits made order-preserving, ~(column) below
    const __m512i b = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));  // -0.0 -> +0.0
    const __m512i hi = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), top));
    const __m512i lo = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(col0 + j))), lane);
    const __m512i k0 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi)), 32),
                                       _mm512_cvtepu32_epi64(_mm512_castsi512_si256(lo)));
    const __m512i k1 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1)), 32),
                                       _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lo, 1)));
    const __mmask8 m0 = static_cast<__mmask8>(m), m1 = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi64(m0, k0));
    n += __builtin_popcount(m0);
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi64(m1, k1));
    n += __builtin_popcount(m1);
  }
  r.n = n;
}
#endif

// Appends the columns >= j of a tile row whose value exceeds the reservoir's threshold
// (or `start`, a lower threshold, while it is not full), cutting back whenever it fills.
// `col0`: the tile's first column within the epoch; `self_col`: the tile column of the
// query's own item (-1: none); tmp: cap entries of scratch.
inline void scan_into(const float* row, int64_t j, int64_t gn, int64_t col0, int64_t self_col, float start,
                      Reservoir& r, int k, int cap, uint64_t* tmp) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cpu_isa_level() >= 2) return scan_into_avx512(row, j, gn, col0, self_col, start, r, k, cap, tmp);
#endif
  float thr = r.full ? r.thr : start;
  uint64_t* const keys = r.keys;
  int n = r.n;  // in a register: the key stores could alias r.n
  uint32_t m = 0;
  for (j = next_hit(row, j, gn, thr, &m); j < gn; j = next_hit(row, j + 16, gn, thr, &m)) {
    while (m) {
      const int64_t c = j + __builtin_ctz(m);
      m &= m - 1;
      if (c == self_col) continue;
      keys[n++] = pack_candidate(row[c], col0 + c);
      if (n < cap) continue;
      r.n = n;
      cut_to_k(r, k, tmp);
      n = r.n;
      thr = r.thr;
      m &= block_mask(row + j, std::min<int64_t>(16, gn - j), thr);
    }
  }
  r.n = n;
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
  sort_desc(r.keys, m, reinterpret_cast<uint64_t*>(ti));
  // the first epoch (the only one, unless G > 2^32 - 1) unpacks straight into the list
  const bool first = *len == 0;
  float* uv = first ? vals : tv;
  int64_t* ui = first ? idx : ti;
  for (int c = 0; c < m; ++c) {
    uv[c] = candidate_value(r.keys[c]);
    ui[c] = base + candidate_column(r.keys[c]);
  }
  if (first) {
    *len = m;
  } else {
    const int out = topk_merge(vals, idx, *len, tv, ti, m, ov, oi, k);
    std::memcpy(vals, ov, sizeof(float) * out);
    std::memcpy(idx, oi, sizeof(int64_t) * out);
    *len = out;
  }
  r.n = 0;  // empty for the next epoch or chunk
  r.full = false;
}

}  // namespace detail

// values [Q, k] fp32 and indices [Q, k] int64 (written), counts [G] int64 (accumulated
// into). Arguments already checked (k <= number of candidates per row).
// tile_fn(q0, qn, g0, gn, out) writes the fp32 tile into `out` ([qn, gn], contiguous).
template <class TileFn>
void topk_centrality_cpu_run(int64_t Q, int64_t G, int64_t k, bool exclude_self, int64_t q_offset,
                             TileFn&& tile_fn, at::Tensor& values, at::Tensor& indices, at::Tensor& counts,
                             TopkCpuTiling tiling = {}) {
  if (Q == 0) return;
  const int64_t qc = std::max<int64_t>(1, std::min(tiling.q_chunk, Q));
  const int64_t gt = std::max<int64_t>(1, std::min(tiling.g_tile, G));
  const int64_t epoch = std::max<int64_t>(1, std::min<int64_t>(tiling.epoch, 0xFFFFFFFFLL));
  const int kk = static_cast<int>(k);
  const int cap = std::max(2 * kk, kk + 16);
  at::Tensor tile_buf = at::empty({qc * gt}, at::TensorOptions().dtype(at::kFloat));
  const int64_t stride = cap + detail::kReservoirSlack;
  std::vector<uint64_t> keys(static_cast<size_t>(qc * stride));
  std::vector<detail::Reservoir> res(qc);
  for (int64_t r = 0; r < qc; ++r) res[r].keys = keys.data() + r * stride;
  std::vector<int> lens(qc);
  float* vals_all = values.data_ptr<float>();
  int64_t* idx_all = indices.data_ptr<int64_t>();
  int64_t* counts_p = counts.data_ptr<int64_t>();

  for (int64_t q0 = 0; q0 < Q; q0 += qc) {
    const int64_t qn = std::min(qc, Q - q0);
    std::fill(lens.begin(), lens.end(), 0);  // the reservoirs are empty: finish_epoch_row leaves them so
    for (int64_t base = 0; base < G; base += epoch) {
      const int64_t e_end = std::min(G, base + epoch);
      for (int64_t g0 = base; g0 < e_end; g0 += gt) {
        const int64_t gn = std::min(gt, e_end - g0);
        at::Tensor tile = tile_buf.narrow(0, 0, qn * gn).view({qn, gn});
        tile_fn(q0, qn, g0, gn, tile);
        const float* tp = tile.const_data_ptr<float>();
        at::parallel_for(0, qn, 16, [&](int64_t r0, int64_t r1) {
          float fold[detail::kFolds];
          std::vector<uint64_t> tmp(cap);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t self_col = exclude_self ? q0 + r + q_offset - g0 : -1;
            const bool has_self = self_col >= 0 && self_col < gn;
            detail::merge_tile_row(tp + r * gn, gn, g0 - base, has_self ? self_col : -1, res[r], kk, cap, fold,
                                   tmp.data());
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
