// wti_similarity, CPU. Texts and videos are cut into blocks of about kRows tokens and
// kCols frames; each (text block, video block) task computes its raw dot products as one
// GEMM tile [nt*L, nv*F] (at::mm, fp32 or fp64 accumulation) and reduces every pair in it
// with the max-and-weigh step of csrc/common/wti.h. Memory: one tile per running task,
// never [Bt, Bv, L, F].
//
// Backward: one GEMM recompute per tile (tasks split among threads as in the forward)
// stores every pair's arg-maxes ([Bt, Bv, L] and [Bt, Bv, F], uint8 while L, F <= 256,
// else int32) and the weight gradients (run-local, summed in run order). dL/dt and dL/dv
// are sparse row sums: each pair has at most L + F nonzero coefficients c (c * v_jf to t's
// row l, c * t_il to v's row f). They are collected per block of pairs, bucketed by the row
// they add to, and each row is updated once per block with its sum held in registers
// (RowSums). Threads split the texts for dL/dt and the videos for dL/dv (one writer per
// output row, no atomics, deterministic for a given thread count); no dense dS.
//
// Float kernels have AVX-512 and AVX2 builds picked at run time (csrc/common/cpu_isa.h):
// the per-pair maxes (F <= 16, AVX-512) and the row sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/wti.h"
#include "common/wti_checks.h"
#include "common/wti_tiled.h"

namespace nbretr {
namespace {

constexpr int64_t kRows = 256;  // text tokens per tile (nt * L)
constexpr int64_t kCols = 256;  // video frames per tile (nv * F)

struct Prepared {
  at::Tensor t, v;               // contiguous, in the inputs' dtype (fp16/bf16 are not copied whole)
  at::Tensor mt, at_, mv, av;    // contiguous, accumulation dtype
  bool low = false;              // tokens narrower than the accumulation dtype
};

Prepared prepare(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight, const at::Tensor& v,
                 const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const auto acc = wti_acc_type(t.scalar_type());
  return {t.contiguous(),         v.contiguous(),         t_mask.to(acc).contiguous(), t_weight.to(acc).contiguous(),
          v_mask.to(acc).contiguous(), v_weight.to(acc).contiguous(), t.scalar_type() != acc};
}

// Rows [r0, r0 + n) of a [rows, D] token matrix in the accumulation dtype: a view, or
// (fp16/bf16 tokens: `scratch` defined) converted into the scratch block.
at::Tensor acc_rows(const at::Tensor& x2, int64_t r0, int64_t n, const at::Tensor& scratch) {
  at::Tensor rows = x2.narrow(0, r0, n);
  return scratch.defined() ? scratch.narrow(0, 0, n).copy_(rows) : rows;
}

// The maxes of one pair and their arg-maxes: row l's (over frames) at best[l], arg[l],
// column f's (over text tokens) at best[L + f], arg[L + f], by the shared scans of
// csrc/common/wti.h (each keeps the first of equal values).
template <typename acc_t>
void pair_max_scan(const WtiPair<acc_t>& p, acc_t* best, int32_t* arg) {
  for (int64_t l = 0; l < p.L; ++l) {
    int64_t a;
    wti_row_max(p, l, best[l], a);
    arg[l] = static_cast<int32_t>(a);
  }
  for (int64_t f = 0; f < p.F; ++f) {
    int64_t a;
    wti_col_max(p, f, best[p.L + f], a);
    arg[p.L + f] = static_cast<int32_t>(a);
  }
}

#if defined(__x86_64__)
// The same for a float pair with F <= 16 frames: one masked AVX-512 vector per text token
// (S[l, f] * m_t[l] * m_v[f] rounded as in the scan); columns by compare-and-blend, a row
// by a max reduction and the first lane equal to it. Returns false, leaving the pair to
// the scan, when a row holds a NaN (the scan skips a NaN after the first entry and keeps
// one in front; the reduction would not).
__attribute__((target("avx512f"), noinline)) bool pair_max_avx512(const WtiPair<float>& p, float* best,
                                                                  int32_t* arg) {
  const __mmask16 m = static_cast<__mmask16>((1u << p.F) - 1);
  const __m512 mv = _mm512_maskz_loadu_ps(m, p.mv);
  __m512 cbest = _mm512_setzero_ps();
  __m512i carg = _mm512_setzero_si512();
  for (int64_t l = 0; l < p.L; ++l) {
    const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.S + l * p.ld), _mm512_set1_ps(p.mt[l])), mv);
    if (_mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q) != 0) return false;
    const float mx = _mm512_mask_reduce_max_ps(m, x);
    const int a = __builtin_ctz(static_cast<unsigned>(_mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(mx), _CMP_EQ_OQ)));
    arg[l] = a;
    best[l] = p.s(l, a);  // the first of the equal values (+0 and -0 compare equal)
    const __mmask16 gt = l == 0 ? m : _mm512_mask_cmp_ps_mask(m, x, cbest, _CMP_GT_OQ);
    cbest = _mm512_mask_mov_ps(cbest, gt, x);
    carg = _mm512_mask_mov_epi32(carg, gt, _mm512_set1_epi32(static_cast<int>(l)));
  }
  _mm512_mask_storeu_ps(best + p.L, m, cbest);
  _mm512_mask_storeu_epi32(arg + p.L, m, carg);
  return true;
}
#endif

template <typename acc_t>
void pair_max(const WtiPair<acc_t>& p, acc_t* best, int32_t* arg) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (p.F <= 16 && cpu_isa_level() >= 2 && pair_max_avx512(p, best, arg)) return;
  }
#endif
  pair_max_scan(p, best, arg);
}

// s_ij of one pair from its maxes: wti_pair_score's sums, in its order
template <typename acc_t>
acc_t pair_score(const WtiPair<acc_t>& p, acc_t* best, int32_t* arg) {
  pair_max(p, best, arg);
  acc_t t2v = 0, v2t = 0;
  for (int64_t l = 0; l < p.L; ++l) t2v += p.at[l] * best[l];
  for (int64_t f = 0; f < p.F; ++f) v2t += p.av[f] * best[p.L + f];
  return acc_t(0.5) * (t2v + v2t);
}

at::Tensor wti_similarity_cpu(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                              const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  const auto acc = wti_acc_type(t.scalar_type());
  auto out = at::empty({d.Bt, d.Bv}, t.options().dtype(acc));
  if (d.Bt == 0 || d.Bv == 0) return out;
  const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
  const int64_t TB = std::max<int64_t>(1, kRows / d.L), VB = std::max<int64_t>(1, kCols / d.F);
  const int64_t nbt = (d.Bt + TB - 1) / TB, nbv = (d.Bv + VB - 1) / VB;
  const auto t2 = p.t.view({d.Bt * d.L, d.D}), v2 = p.v.view({d.Bv * d.F, d.D});

  AT_DISPATCH_FLOATING_TYPES(acc, "wti_similarity_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
    const acc_t *wt = p.at_.const_data_ptr<acc_t>(), *wv = p.av.const_data_ptr<acc_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    // one tile buffer per run, allocated here (no allocation on worker threads)
    const int64_t ntasks = nbt * nbv;
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
    const auto aopt = p.t.options().dtype(acc);
    auto tiles = at::empty({runs, TB * d.L * VB * d.F}, aopt);
    auto maxbuf = at::empty({runs, d.L + d.F}, aopt);
    auto argbuf = at::empty({runs, d.L + d.F}, aopt.dtype(at::kInt));
    // fp16/bf16 tokens: the smaller side converted whole, the larger block by block, its
    // blocks outermost so that each is converted once per run (tasks video-major when
    // the texts are converted whole, else text-major)
    const bool texts_whole = p.low && d.Bt * d.L <= d.Bv * d.F;
    const auto t_src = texts_whole ? t2.to(acc) : t2;
    const auto v_src = p.low && !texts_whole ? v2.to(acc) : v2;
    const auto tscr = p.low && !texts_whole ? at::empty({runs, TB * d.L, d.D}, aopt) : at::Tensor();
    const auto vscr = texts_whole ? at::empty({runs, VB * d.F, d.D}, aopt) : at::Tensor();
    at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
      at::NoGradGuard no_grad;
      for (int64_t r = rb; r < re; ++r) {
        acc_t* mb = maxbuf.mutable_data_ptr<acc_t>() + r * (d.L + d.F);
        int32_t* ab = argbuf.mutable_data_ptr<int32_t>() + r * (d.L + d.F);
        at::Tensor T, V;
        int64_t t_at = -1, v_at = -1;  // the blocks in T and V
        for (int64_t task = ntasks * r / runs; task < ntasks * (r + 1) / runs; ++task) {
          const int64_t tb = texts_whole ? task % nbt : task / nbv, vb = texts_whole ? task / nbt : task % nbv;
          const int64_t i0 = tb * TB, j0 = vb * VB;
          const int64_t nt = std::min(TB, d.Bt - i0), nv = std::min(VB, d.Bv - j0);
          at::Tensor S = tiles[r].narrow(0, 0, nt * d.L * nv * d.F).view({nt * d.L, nv * d.F});
          if (tb != t_at) T = acc_rows(t_src, i0 * d.L, nt * d.L, tscr.defined() ? tscr[r] : at::Tensor());
          if (vb != v_at) V = acc_rows(v_src, j0 * d.F, nv * d.F, vscr.defined() ? vscr[r] : at::Tensor());
          t_at = tb;
          v_at = vb;
          at::mm_out(S, T, V.t());
          const acc_t* s = S.const_data_ptr<acc_t>();
          const int64_t ld = nv * d.F;
          for (int64_t ii = 0; ii < nt; ++ii) {
            const int64_t i = i0 + ii;
            for (int64_t jj = 0; jj < nv; ++jj) {
              const int64_t j = j0 + jj;
              WtiPair<acc_t> pair{s + ii * d.L * ld + jj * d.F, ld, mt + i * d.L, mv + j * d.F,
                                  wt + i * d.L, wv + j * d.F, d.L, d.F};
              o[i * d.Bv + j] = pair_score(pair, mb, ab);
            }
          }
        }
      }
    });
  });
  return out;
}

// ---- backward helpers ------------------------------------------------------------------

// Row sums of the backward. Entries (destination row, source row, coefficient) are
// collected for one block of pairs and bucketed by destination row; then every row r
// with entries gets y_r += sum_e c_e * x_{src_e}. D is walked in chunks of 32 floats, all
// rows per chunk, so that the chunk of every source row of the block (a few hundred rows:
// 32 KB) stays in L1. A row's chunk is held in registers over its entries, in 4 (AVX-512)
// or 2 (AVX2) independent accumulators taking every 4th / 2nd entry, so that the loop is
// bound by loads, not by the FMA latency; the accumulators are added in a fixed order
// (deterministic, a different rounding than the plain sum of the generic path).
// `end[r]` is one past row r's last entry (row r starts at end[r - 1], 0 for r = 0).
template <typename T>
void gather_rows_base(T* __restrict y, const T* __restrict x, int64_t D, int64_t rows, const int32_t* end,
                      const T* c, const int32_t* src) {
  for (int64_t r = 0, b = 0; r < rows; b = end[r++])
    for (int64_t e = b; e < end[r]; ++e) {
      const T* xs = x + src[e] * D;
      T* yr = y + r * D;
      for (int64_t k = 0; k < D; ++k) yr[k] += c[e] * xs[k];
    }
}
#if defined(__x86_64__)
__attribute__((target("avx512f"), noinline)) void gather_rows_avx512(float* __restrict y,
                                                                     const float* __restrict x, int64_t D,
                                                                     int64_t rows, const int32_t* end,
                                                                     const float* c, const int32_t* src) {
  for (int64_t k = 0; k < D; k += 32) {
    const int64_t w = std::min<int64_t>(32, D - k);
    const __mmask16 m0 = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
    const __mmask16 m1 = w >= 32 ? 0xFFFF : w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : 0;
    const float* xk = x + k;
    for (int64_t r = 0, b = 0; r < rows; b = end[r++]) {
      const int64_t e1 = end[r];
      if (e1 == b) continue;
      float* yr = y + r * D + k;
      __m512 a[4], h[4];
      a[0] = _mm512_maskz_loadu_ps(m0, yr), h[0] = _mm512_maskz_loadu_ps(m1, yr + 16);
      for (int u = 1; u < 4; ++u) a[u] = h[u] = _mm512_setzero_ps();
      int64_t e = b;
      if (w == 32) {
        for (; e + 4 <= e1; e += 4)
          for (int u = 0; u < 4; ++u) {
            const __m512 ce = _mm512_set1_ps(c[e + u]);
            const float* xs = xk + src[e + u] * D;
            a[u] = _mm512_fmadd_ps(ce, _mm512_loadu_ps(xs), a[u]);
            h[u] = _mm512_fmadd_ps(ce, _mm512_loadu_ps(xs + 16), h[u]);
          }
      }
      for (; e < e1; ++e) {
        const __m512 ce = _mm512_set1_ps(c[e]);
        const float* xs = xk + src[e] * D;
        a[0] = _mm512_fmadd_ps(ce, _mm512_maskz_loadu_ps(m0, xs), a[0]);
        h[0] = _mm512_fmadd_ps(ce, _mm512_maskz_loadu_ps(m1, xs + 16), h[0]);
      }
      const __m512 lo = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
      const __m512 hi = _mm512_add_ps(_mm512_add_ps(h[0], h[1]), _mm512_add_ps(h[2], h[3]));
      _mm512_mask_storeu_ps(yr, m0, lo);
      _mm512_mask_storeu_ps(yr + 16, m1, hi);
    }
  }
}
__attribute__((target("avx2,fma"), noinline)) void gather_rows_avx2(float* __restrict y, const float* __restrict x,
                                                                     int64_t D, int64_t rows, const int32_t* end,
                                                                     const float* c, const int32_t* src) {
  const int64_t D32 = D / 32 * 32;
  for (int64_t k = 0; k < D32; k += 32) {
    const float* xk = x + k;
    for (int64_t r = 0, b = 0; r < rows; b = end[r++]) {
      const int64_t e1 = end[r];
      if (e1 == b) continue;
      float* yr = y + r * D + k;
      __m256 a[2][4];
      for (int q = 0; q < 4; ++q) a[0][q] = _mm256_loadu_ps(yr + 8 * q), a[1][q] = _mm256_setzero_ps();
      int64_t e = b;
      for (; e + 2 <= e1; e += 2)
        for (int u = 0; u < 2; ++u) {
          const __m256 ce = _mm256_set1_ps(c[e + u]);
          const float* xs = xk + src[e + u] * D;
          for (int q = 0; q < 4; ++q) a[u][q] = _mm256_fmadd_ps(ce, _mm256_loadu_ps(xs + 8 * q), a[u][q]);
        }
      if (e < e1) {
        const __m256 ce = _mm256_set1_ps(c[e]);
        const float* xs = xk + src[e] * D;
        for (int q = 0; q < 4; ++q) a[0][q] = _mm256_fmadd_ps(ce, _mm256_loadu_ps(xs + 8 * q), a[0][q]);
      }
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(yr + 8 * q, _mm256_add_ps(a[0][q], a[1][q]));
    }
  }
  if (D32 == D) return;
  for (int64_t r = 0, b = 0; r < rows; b = end[r++])
    for (int64_t e = b; e < end[r]; ++e)
      for (int64_t k = D32; k < D; ++k) y[r * D + k] += c[e] * x[src[e] * D + k];
}
#endif

template <typename T>
using GatherFn = void (*)(T*, const T*, int64_t, int64_t, const int32_t*, const T*, const int32_t*);
template <typename T>
GatherFn<T> pick_gather() {
  return &gather_rows_base<T>;
}
#if defined(__x86_64__)
template <>
GatherFn<float> pick_gather<float>() {
  const int isa = cpu_isa_level();
  return isa >= 2 ? &gather_rows_avx512 : isa == 1 ? &gather_rows_avx2 : &gather_rows_base<float>;
}
#endif

// The entries of one block of pairs, bucketed by destination row (a stable counting sort,
// so each row sums its entries in collection order: deterministic). Storage is carved
// from one tensor per run, allocated before the parallel region.
template <typename acc_t>
struct RowSums {
  int64_t rows = 0, n = 0;
  acc_t *c = nullptr, *c_sorted = nullptr;
  int32_t *dst = nullptr, *src = nullptr, *src_sorted = nullptr, *start = nullptr;  // start: [rows + 1]

  static int64_t bytes(int64_t rows, int64_t cap) {
    return 2 * cap * static_cast<int64_t>(sizeof(acc_t) + sizeof(int32_t)) + cap * 4 + (rows + 1) * 4;
  }
  RowSums(char* mem, int64_t rows_, int64_t cap) : rows(rows_) {
    c = reinterpret_cast<acc_t*>(mem);
    c_sorted = c + cap;
    src = reinterpret_cast<int32_t*>(c_sorted + cap);
    src_sorted = src + cap;
    dst = src_sorted + cap;
    start = dst + cap;
  }
  void add(int64_t d, int64_t s, acc_t coef) {
    dst[n] = static_cast<int32_t>(d);
    src[n] = static_cast<int32_t>(s);
    c[n++] = coef;
  }
  // y[r] += sum of the entries of row r (rows of length D; x: the source rows)
  void flush(acc_t* y, const acc_t* x, int64_t D, GatherFn<acc_t> gather) {
    if (n == 0) return;
    std::fill(start, start + rows + 1, 0);
    for (int64_t e = 0; e < n; ++e) ++start[dst[e] + 1];
    for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
    for (int64_t e = 0; e < n; ++e) {
      const int32_t at = start[dst[e]]++;
      c_sorted[at] = c[e];
      src_sorted[at] = src[e];
    }
    gather(y, x, D, rows, start, c_sorted, src_sorted);  // start[r] is now the end of row r
    n = 0;
  }
};

// Arg-maxes of one pair stored as idx_t, with the weight gradients:
// gwt[l] += hg * max_f S[l, f], gwv[f] += hg * max_l S[l, f]. best/arg: scratch [L + F].
template <typename acc_t, typename idx_t>
inline void pair_argmax(const WtiPair<acc_t>& p, acc_t hg, idx_t* ar, idx_t* ac, acc_t* gwt, acc_t* gwv,
                        acc_t* best, int32_t* arg) {
  pair_max(p, best, arg);
  for (int64_t l = 0; l < p.L; ++l) {
    ar[l] = static_cast<idx_t>(arg[l]);
    gwt[l] += hg * best[l];
  }
  for (int64_t f = 0; f < p.F; ++f) {
    ac[f] = static_cast<idx_t>(arg[p.L + f]);
    gwv[f] += hg * best[p.L + f];
  }
}

template <typename acc_t, typename idx_t>
void backward_impl(const WtiDims& d, const Prepared& p, const acc_t* gp, at::Tensor& gt, at::Tensor& gwt,
                   at::Tensor& gv, at::Tensor& gwv) {
  const int64_t L = d.L, F = d.F, D = d.D, Bt = d.Bt, Bv = d.Bv;
  const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
  const acc_t *wt = p.at_.const_data_ptr<acc_t>(), *wv = p.av.const_data_ptr<acc_t>();
  const auto aopt = p.mt.options();
  const auto t2 = p.t.view({Bt * L, D}), v2 = p.v.view({Bv * F, D});
  const auto idx_dtype = sizeof(idx_t) == 1 ? at::kByte : at::kInt;
  // 1) one GEMM recompute: the arg-maxes of every pair ([Bt, Bv, L] and [Bt, Bv, F]) and
  //    the weight gradients (run-local, summed in run order: deterministic per thread count)
  auto AR = at::empty({Bt, Bv, L}, aopt.dtype(idx_dtype));
  auto AC = at::empty({Bt, Bv, F}, aopt.dtype(idx_dtype));
  idx_t* arp = static_cast<idx_t*>(AR.data_ptr());
  idx_t* acp = static_cast<idx_t*>(AC.data_ptr());
  const int64_t TB = std::max<int64_t>(1, kRows / L), VB = std::max<int64_t>(1, kCols / F);
  const int64_t nbt = (Bt + TB - 1) / TB, nbv = (Bv + VB - 1) / VB, ntasks = nbt * nbv;
  const int64_t nthreads = at::get_num_threads();
  // fused: enough text blocks to split them among threads, so each thread owns its texts'
  // dL/dt rows and adds them while the tile's videos are still in cache
  const bool fused = nbt >= 2 * nthreads;
  const int64_t runs = fused ? nthreads : std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  // per run: one S tile, the maxes and arg-maxes of one pair, the entries of one block of
  // pairs (a block is a tile's TB texts x VB videos, at most L + F entries per pair)
  // bucketed by text row or by video row
  const int64_t cap = TB * VB * (L + F);
  const int64_t sums_bytes = std::max(RowSums<acc_t>::bytes(TB * L, cap), RowSums<acc_t>::bytes(VB * F, cap));
  auto tiles = at::empty({runs, TB * L * VB * F}, aopt);
  auto lwt = at::zeros({fused ? 1 : runs, Bt * L}, aopt);
  auto lwv = at::zeros({runs, Bv * F}, aopt);
  auto maxbuf = at::empty({runs, L + F}, aopt);
  auto argbuf = at::empty({runs, L + F}, aopt.dtype(at::kInt));
  auto sums_mem = at::empty({runs, sums_bytes}, aopt.dtype(at::kByte));
  // fp16/bf16 tokens: the texts converted once whole (t_acc: the products and the dL/dv
  // sums read them), the video blocks per tile (vscr), each video block's dL/dv summed in
  // gscr, then written to gv (already in the tokens' dtype); dL/dt is summed in gt
  // (accumulation dtype) whole.
  const auto vscr = p.low ? at::empty({runs, VB * F, D}, aopt) : at::Tensor();
  const auto gscr = p.low ? at::empty({runs, VB * F, D}, aopt) : at::Tensor();
  const auto t_acc = p.low ? t2.to(aopt.dtype().toScalarType()) : t2;
  const acc_t* tp = t_acc.const_data_ptr<acc_t>();
  const GatherFn<acc_t> gather = pick_gather<acc_t>();
  acc_t* gtp = gt.mutable_data_ptr<acc_t>();
  auto run_sums = [&](int64_t r, int64_t rows) {
    return RowSums<acc_t>(static_cast<char*>(sums_mem[r].data_ptr()), rows, cap);
  };
  // Every nonzero (text token l, frame f, coefficient c) of pair (i, j)'s gradient,
  // from its arg-maxes, coefficients as in wti_pair_backward (csrc/common/wti.h):
  // dL/dt_il += c v_jf and dL/dv_jf += c t_il; the dL/dt and the dL/dv sums walk the
  // same entries.
  auto for_each_coef = [&](int64_t i, int64_t j, acc_t hg, auto&& visit) {
    const idx_t* ar = arp + (i * Bv + j) * L;
    const idx_t* ac = acp + (i * Bv + j) * F;
    const WtiPair<acc_t> pair{nullptr, 0, mt + i * L, mv + j * F, wt + i * L, wv + j * F, L, F};  // no S needed
    for (int64_t l = 0; l < L; ++l) {
      const int64_t a = ar[l];
      const acc_t c = wti_row_coef(pair, hg, l, a);
      if (c != acc_t(0)) visit(l, a, c);
    }
    for (int64_t f = 0; f < F; ++f) {
      const int64_t a = ac[f];
      const acc_t c = wti_col_coef(pair, hg, a, f);
      if (c != acc_t(0)) visit(a, f, c);
    }
  };
  // dL/dt (to_text) or dL/dv rows of one block of pairs (texts i0 + [0, nt), videos
  // j0 + [0, nv)) from the stored arg-maxes, added into the block's rows at y; x: the
  // block's source rows (its videos' for dL/dt, its texts' for dL/dv)
  auto add_block = [&](int64_t r, bool to_text, int64_t i0, int64_t nt, int64_t j0, int64_t nv, acc_t* y,
                       const acc_t* x) {
    RowSums<acc_t> sums = run_sums(r, to_text ? nt * L : nv * F);
    for (int64_t ii = 0; ii < nt; ++ii)
      for (int64_t jj = 0; jj < nv; ++jj) {
        const acc_t g = gp[(i0 + ii) * Bv + j0 + jj];
        if (g == acc_t(0)) continue;
        for_each_coef(i0 + ii, j0 + jj, acc_t(0.5) * g, [&](int64_t l, int64_t f, acc_t c) {
          if (to_text)
            sums.add(ii * L + l, jj * F + f, c);
          else
            sums.add(jj * F + f, ii * L + l, c);
        });
      }
    sums.flush(y, x, D, gather);
  };
  auto do_task = [&](int64_t task, int64_t r, acc_t* gwt_r) {
    acc_t* gwv_r = lwv.mutable_data_ptr<acc_t>() + r * Bv * F;
    acc_t* mb = maxbuf.mutable_data_ptr<acc_t>() + r * (L + F);
    int32_t* ab = argbuf.mutable_data_ptr<int32_t>() + r * (L + F);
    const int64_t i0 = task / nbv * TB, j0 = task % nbv * VB;
    const int64_t nt = std::min(TB, Bt - i0), nv = std::min(VB, Bv - j0);
    at::Tensor S = tiles[r].narrow(0, 0, nt * L * nv * F).view({nt * L, nv * F});
    const auto V = acc_rows(v2, j0 * F, nv * F, p.low ? vscr[r] : at::Tensor());
    at::mm_out(S, t_acc.narrow(0, i0 * L, nt * L), V.t());
    const acc_t* s = S.const_data_ptr<acc_t>();
    const int64_t ld = nv * F;
    for (int64_t ii = 0; ii < nt; ++ii) {
      const int64_t i = i0 + ii;
      for (int64_t jj = 0; jj < nv; ++jj) {
        const int64_t j = j0 + jj;
        const acc_t g = gp[i * Bv + j];
        if (g == acc_t(0)) continue;  // the dL/dt and dL/dv passes skip the pair too
        WtiPair<acc_t> pair{s + ii * L * ld + jj * F, ld, mt + i * L, mv + j * F, wt + i * L, wv + j * F, L, F};
        pair_argmax<acc_t, idx_t>(pair, acc_t(0.5) * g, arp + (i * Bv + j) * L, acp + (i * Bv + j) * F,
                                  gwt_r + i * L, gwv_r + j * F, mb, ab);
      }
    }
    if (fused) add_block(r, true, i0, nt, j0, nv, gtp + i0 * L * D, V.const_data_ptr<acc_t>());  // in cache
  };
  if (fused) {
    // text blocks split among threads (at::parallel_for's static split: deterministic
    // for a given thread count); gwt rows are owned, gwv is thread-local
    at::parallel_for(0, nbt, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;
      // (clamped: a nested call runs inline on one thread whatever its number)
      const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
      for (int64_t tb = b0; tb < b1; ++tb)
        for (int64_t vb = 0; vb < nbv; ++vb) do_task(tb * nbv + vb, r, gwt.mutable_data_ptr<acc_t>());
    });
  } else {
    at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
      at::NoGradGuard no_grad;
      for (int64_t r = rb; r < re; ++r)
        for (int64_t task = ntasks * r / runs; task < ntasks * (r + 1) / runs; ++task)
          do_task(task, r, lwt.mutable_data_ptr<acc_t>() + r * Bt * L);
    });
    gwt.view({Bt * L}).copy_(lwt.sum(0));
  }
  gwv.view({Bv * F}).copy_(lwv.sum(0));
  tiles = at::Tensor();

  // 2) dL/dt (unless fused above) and dL/dv from the arg-maxes, block by block: texts are
  //    split among threads for dL/dt and videos for dL/dv (one writer per row), no dense dS
  if (!fused) {
    at::parallel_for(0, nbt, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
      for (int64_t tb = b0; tb < b1; ++tb)
        for (int64_t vb = 0; vb < nbv; ++vb) {
          const int64_t i0 = tb * TB, j0 = vb * VB, nv = std::min(VB, Bv - j0);
          const auto V = acc_rows(v2, j0 * F, nv * F, p.low ? vscr[r] : at::Tensor());
          add_block(r, true, i0, std::min(TB, Bt - i0), j0, nv, gtp + i0 * L * D, V.const_data_ptr<acc_t>());
        }
    });
  }
  auto gv2 = gv.view({Bv * F, D});
  at::parallel_for(0, nbv, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
    for (int64_t vb = b0; vb < b1; ++vb) {
      const int64_t j0 = vb * VB, nv = std::min(VB, Bv - j0);
      acc_t* y = p.low ? gscr[r].mutable_data_ptr<acc_t>() : gv2.mutable_data_ptr<acc_t>() + j0 * F * D;
      if (p.low) std::fill(y, y + nv * F * D, acc_t(0));
      for (int64_t tb = 0; tb < nbt; ++tb) {
        const int64_t i0 = tb * TB;
        add_block(r, false, i0, std::min(TB, Bt - i0), j0, nv, y, tp + i0 * L * D);
      }
      if (p.low) gv2.narrow(0, j0 * F, nv * F).copy_(gscr[r].narrow(0, 0, nv * F));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wti_similarity_backward_cpu(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
    const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  check_wti_grad(grad, d, t);
  at::NoGradGuard no_grad;
  const auto acc = wti_acc_type(t.scalar_type());
  auto gt = at::zeros({d.Bt, d.L, d.D}, t.options().dtype(acc));
  auto gv = at::zeros({d.Bv, d.F, d.D}, v.options());  // written block by block in v's dtype
  auto gwt = at::zeros({d.Bt, d.L}, t.options().dtype(acc));
  auto gwv = at::zeros({d.Bv, d.F}, t.options().dtype(acc));
  if (d.Bt > 0 && d.Bv > 0 && d.D > 0) {  // D == 0: every gradient is 0
    const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
    const at::Tensor g = grad.to(acc).contiguous();
    const bool small = std::max(d.L, d.F) <= 256;
    AT_DISPATCH_FLOATING_TYPES(acc, "wti_similarity_backward_cpu", [&] {
      if (small)
        backward_impl<scalar_t, uint8_t>(d, p, g.const_data_ptr<scalar_t>(), gt, gwt, gv, gwv);
      else
        backward_impl<scalar_t, int32_t>(d, p, g.const_data_ptr<scalar_t>(), gt, gwt, gv, gwv);
    });
  }
  return {gt.to(t.scalar_type()), gwt.to(t_weight.scalar_type()), gv,
          gwv.to(v_weight.scalar_type())};
}

// ---- test hook: the GPU's tiled driver (csrc/common/wti_tiled.h) with a host loop in
// place of its per-pair kernel, so that the CPU tests check its tiling and gradient algebra.

struct HostLaunch {
  template <typename acc_t>
  void score(const WtiTileArgs<acc_t>& a, int64_t pairs) {
    for (int64_t p = 0; p < pairs; ++p) wti_tile_score(a, p);
  }
  template <typename acc_t>
  void backward(const WtiTileArgs<acc_t>& a, int64_t pairs) {
    for (int64_t p = 0; p < pairs; ++p) wti_tile_backward(a, p);
  }
};

void check_tile(int64_t tile_rows, int64_t tile_cols) {
  NBRETR_CHECK_ARG(tile_rows >= 1 && tile_cols >= 1, "_wti_tiled", "tile_rows and tile_cols must be >= 1, got ",
                   tile_rows, " and ", tile_cols);
}

at::Tensor wti_tiled_cpu(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                         const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                         int64_t tile_rows, int64_t tile_cols) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  check_tile(tile_rows, tile_cols);
  at::NoGradGuard no_grad;
  HostLaunch launch;
  return wti_tiled_forward(t, t_mask, t_weight, v, v_mask, v_weight, d, tile_rows, tile_cols, false, launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wti_tiled_backward_cpu(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
    const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight, int64_t tile_rows,
    int64_t tile_cols) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  check_wti_grad(grad, d, t);
  check_tile(tile_rows, tile_cols);
  at::NoGradGuard no_grad;
  HostLaunch launch;
  return wti_tiled_backward(grad, t, t_mask, t_weight, v, v_mask, v_weight, d, tile_rows, tile_cols, false,
                            launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) {
  m.impl("wti_similarity", &wti_similarity_cpu);
  m.impl("wti_similarity_backward", &wti_similarity_backward_cpu);
  m.impl("_wti_tiled", &wti_tiled_cpu);
  m.impl("_wti_tiled_backward", &wti_tiled_backward_cpu);
}

}  // namespace nbretr
