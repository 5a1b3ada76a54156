// wti_similarity, CPU. Texts and videos are cut into blocks of about kRows tokens and
// kCols frames (their counts a multiple of the thread count where possible); each (text
// block, video block) task computes its raw dot products as one GEMM tile (at::mm, fp32 or
// fp64 accumulation) and reduces every pair in it with the max-and-weigh step of
// csrc/common/wti.h. The tiles hold only the tokens whose mask is not 0 ("kept"): a masked
// entry of S is 0 and is put back into each max without being computed, which is exact
// while the products are finite (see "the kept tokens" below). The side with fewer kept
// tokens is compacted whole, the other block by block (its blocks outermost, so each is
// compacted once per thread; views when nothing is dropped). Memory: one tile per running
// task and the compacted side, never [Bt, Bv, L, F]. Results are deterministic for a given
// thread count; the tiles, and so the products' rounding, follow the thread count.
//
// Backward: one GEMM recompute per tile (tasks split among threads as in the forward)
// stores every pair's arg-maxes ([Bt, Bv, L] and [Bt, Bv, F], uint8 while L, F <= 256,
// else int32) and the weight gradients (run-local, summed in run order). dL/dt and dL/dv
// are sparse row sums: each pair has at most L + F nonzero coefficients c (c * v_jf to t's
// row l, c * t_il to v's row f). They are collected per block of pairs, bucketed by the row
// they add to, and each row is updated once per block with its sum held in registers
// (RowSums). Threads split the texts for dL/dt and the videos for dL/dv (one writer per
// output row, no atomics, deterministic for a given thread count); no dense dS. fp16/bf16
// tokens are never copied whole: the row sums read them converted on load, and dL/dt and
// dL/dv are summed per block in fp32, then written in the tokens' dtype.
//
// Float kernels have AVX-512 and AVX2 builds picked at run time (csrc/common/cpu_isa.h):
// the per-pair maxes (F <= 16, AVX-512) and the row sums.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/settings.h"
#include "common/wti.h"
#include "common/wti_checks.h"
#include "common/wti_tiled.h"
#include "testing.h"

namespace nbretr {
namespace {

constexpr int64_t kRows = 256;  // text tokens per tile (nt * L)
constexpr int64_t kCols = 256;  // video frames per tile (nv * F)

struct Prepared {
  at::Tensor t, v;               // contiguous, in the inputs' dtype (fp16/bf16 are not copied whole)
  at::Tensor mt, wt, mv, wv;     // masks and weights: contiguous, accumulation dtype
  bool low = false;              // tokens narrower than the accumulation dtype
};

Prepared prepare(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight, const at::Tensor& v,
                 const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const auto acc = wti_acc_type(t.scalar_type());
  return {t.contiguous(),         v.contiguous(),         t_mask.to(acc).contiguous(), t_weight.to(acc).contiguous(),
          v_mask.to(acc).contiguous(), v_weight.to(acc).contiguous(), t.scalar_type() != acc};
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

// ---- the kept tokens ------------------------------------------------------------------
//
// A masked entry of S is raw * m_t * m_v = 0, so a masked token's dot products need not be
// computed: the GEMM tiles take the tokens with a nonzero mask only ("kept"), and each
// pair's maxes over its kept block are completed with the dropped entries' zeros. A row
// max over kept frames is b at frame a; with a dropped frame (the first at f0) the row's
// entries also hold zeros, so its max is b if b > 0, 0 at f0 if b < 0, and 0 at
// min(a, f0) if b == 0 (ties to the lowest index, +0 == -0); a dropped token's row is
// all zeros (max 0 at frame 0). Columns likewise. The result is the full scan's, maxes and
// arg-maxes, provided every dropped product is finite (then it is +-0): tokens are dropped
// only when D * max|t| * max|v| * max|m_t| * max|m_v| is finite, the weights and the
// upstream gradient too (their products with a dropped entry are skipped as zeros), and
// the wti_cpu_compact kernel setting is on (csrc/common/settings.h). Otherwise every token is kept (as the GPU's tiled
// driver always does).

template <typename acc_t>
struct Side {
  int64_t B = 0, N = 0, rows = 0;  // items, tokens per item, kept tokens
  std::vector<int64_t> off;        // [B + 1]: item b's kept tokens are compact rows [off[b], off[b + 1])
  std::vector<int32_t> tok;        // [rows]: a compact row's token index within its item
  std::vector<int32_t> pos;        // [B * N]: token (b, n)'s compact row within its item, -1 if dropped
  std::vector<acc_t> mask;         // [rows]: the kept tokens' mask values
  std::vector<int32_t> first_drop; // [B]: the lowest dropped token of item b, N if none
  std::vector<int64_t> blocks;     // block k is items [blocks[k], blocks[k + 1])
  int64_t max_items = 0, max_rows = 0;

  int64_t nblocks() const { return static_cast<int64_t>(blocks.size()) - 1; }
  int64_t kept(int64_t b) const { return off[b + 1] - off[b]; }
  bool dropped_any() const { return rows != B * N; }
};

// The side's kept tokens (every token unless `drop`) and its blocks of consecutive items:
// about block_rows kept tokens each, at most 2 * block_rows / N items, their number a
// multiple of the thread count where there are enough items (the passes that split blocks
// among threads stay balanced), split where the running count of kept tokens plus items
// crosses an equal share.
template <typename acc_t>
Side<acc_t> make_side(const acc_t* m, int64_t B, int64_t N, bool drop, int64_t block_rows) {
  Side<acc_t> s;
  s.B = B;
  s.N = N;
  s.off.resize(B + 1);
  s.pos.assign(B * N, -1);
  s.first_drop.assign(B, static_cast<int32_t>(N));
  s.tok.reserve(B * N);
  s.mask.reserve(B * N);
  for (int64_t b = 0; b < B; ++b) {
    s.off[b] = static_cast<int64_t>(s.tok.size());
    for (int64_t n = 0; n < N; ++n) {
      const acc_t x = m[b * N + n];
      if (!drop || x != acc_t(0)) {
        s.pos[b * N + n] = static_cast<int32_t>(s.tok.size() - s.off[b]);
        s.tok.push_back(static_cast<int32_t>(n));
        s.mask.push_back(x);
      } else if (s.first_drop[b] == N) {
        s.first_drop[b] = static_cast<int32_t>(n);
      }
    }
  }
  s.rows = s.off[B] = static_cast<int64_t>(s.tok.size());
  const int64_t cap_items = 2 * std::max<int64_t>(1, block_rows / N);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nb = std::max<int64_t>({1, (s.rows + block_rows - 1) / block_rows, (B + cap_items - 1) / cap_items});
  nb = std::min<int64_t>(B, (nb + threads - 1) / threads * threads);
  const int64_t total = s.rows + B;  // an item weighs its kept tokens + 1
  s.blocks.push_back(0);
  for (int64_t b0 = 0, k = 1; b0 < B; ++k) {
    int64_t b1 = b0 + 1;
    while (b1 < B && b1 - b0 < cap_items && (s.off[b1] + b1) * nb < k * total) ++b1;
    s.blocks.push_back(b1);
    s.max_items = std::max(s.max_items, b1 - b0);
    s.max_rows = std::max(s.max_rows, s.off[b1] - s.off[b0]);
    b0 = b1;
  }
  return s;
}

// max |x| over a tensor as a double (inf or NaN when x holds one); 0 when empty
double max_abs(const at::Tensor& x) {
  if (x.numel() == 0) return 0;
  const auto mm = at::aminmax(x);
  const double lo = std::abs(std::get<0>(mm).item<double>()), hi = std::abs(std::get<1>(mm).item<double>());
  return lo != lo || hi != hi ? std::numeric_limits<double>::quiet_NaN() : std::max(lo, hi);
}

// Whether masked tokens may be dropped (see above); `grad` may be undefined (forward).
bool may_drop(const Prepared& p, const WtiDims& d, const at::Tensor& grad, double limit) {
  if (!kernel_settings().wti_cpu_compact.load(std::memory_order_relaxed)) return false;
  const double mt = max_abs(p.mt), mv = max_abs(p.mv);
  const double raw = static_cast<double>(d.D) * max_abs(p.t) * max_abs(p.v) * mt * mv;
  // a gradient coefficient is g/2 * weight * m_t * m_v (csrc/common/wti.h)
  const double coef = (grad.defined() ? max_abs(grad) : 1.0) * (max_abs(p.wt) + max_abs(p.wv)) * mt * mv;
  return raw < limit && coef < limit;  // false for inf and NaN
}

// Both sides, tokens dropped where allowed and where a mask is 0.
template <typename acc_t>
std::pair<Side<acc_t>, Side<acc_t>> make_sides(const Prepared& p, const WtiDims& d, const at::Tensor& grad) {
  const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
  auto ts = make_side(mt, d.Bt, d.L, true, kRows);
  auto vs = make_side(mv, d.Bv, d.F, true, kCols);
  if ((ts.dropped_any() || vs.dropped_any()) &&
      !may_drop(p, d, grad, static_cast<double>(std::numeric_limits<acc_t>::max()) / 4)) {
    ts = make_side(mt, d.Bt, d.L, false, kRows);
    vs = make_side(mv, d.Bv, d.F, false, kCols);
  }
  return {std::move(ts), std::move(vs)};
}

// The kept rows of items [b0, b1) of x2 ([B * N, D], any float dtype) in the accumulation
// dtype, into dst ([off[b1] - off[b0], D]).
template <typename acc_t>
void copy_kept(const Side<acc_t>& s, const at::Tensor& x2, int64_t b0, int64_t b1, acc_t* dst, int64_t ld) {
  const int64_t D = x2.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "copy_kept", [&] {
    const scalar_t* x = x2.const_data_ptr<scalar_t>();
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = s.off[b]; r < s.off[b + 1]; ++r) {
        const scalar_t* src = x + (b * s.N + s.tok[r]) * D;
        acc_t* out = dst + (r - s.off[b0]) * ld;
        if constexpr (std::is_same_v<scalar_t, acc_t>)
          std::copy(src, src + D, out);
        else
          for (int64_t k = 0; k < D; ++k) out[k] = static_cast<acc_t>(src[k]);
      }
  });
}

// Every kept row of the side, compact, in the accumulation dtype (x2 itself when nothing
// is dropped and it has that dtype).
// Row stride of the compact copies: a whole number of cache lines, odd, so that the rows'
// chunks spread over the L1 sets (at D = 512 plain rows sit 2 KB apart, and the gather's
// chunk of every source row would fall in the same few sets).
inline int64_t padded_ld(int64_t D) {
  const int64_t lines = (D + 15) / 16;
  return (lines | 1) * 16;
}

template <typename acc_t>
at::Tensor kept_whole(const Side<acc_t>& s, const at::Tensor& x2, const at::TensorOptions& aopt) {
  if (!s.dropped_any() && x2.scalar_type() == aopt.dtype().toScalarType()) return x2;
  const int64_t D = x2.size(1), ld = padded_ld(D);
  at::Tensor out = at::empty({s.rows, ld}, aopt);
  acc_t* o = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, s.B, 64, [&](int64_t b0, int64_t b1) { copy_kept(s, x2, b0, b1, o + s.off[b0] * ld, ld); });
  return out.narrow(1, 0, D);
}

// The kept rows of block k: a view of x2 when the block drops nothing and x2 has the
// accumulation dtype, else copied into `scratch` ([>= max_rows, padded_ld(D)]).
template <typename acc_t>
at::Tensor kept_block(const Side<acc_t>& s, const at::Tensor& x2, int64_t k, const at::Tensor& scratch) {
  const int64_t b0 = s.blocks[k], b1 = s.blocks[k + 1], n = s.off[b1] - s.off[b0];
  if (n == (b1 - b0) * s.N && x2.scalar_type() == scratch.scalar_type()) return x2.narrow(0, b0 * s.N, n);
  copy_kept(s, x2, b0, b1, scratch.mutable_data_ptr<acc_t>(), scratch.size(1));
  return scratch.narrow(0, 0, n).narrow(1, 0, x2.size(1));
}

// A max over kept entries (b at a) completed with the zeros of dropped ones (see above).
template <typename acc_t>
inline void with_dropped_zeros(acc_t b, int32_t a, bool dropped, int32_t first_dropped, acc_t& best, int32_t& arg) {
  if (dropped && b < acc_t(0)) {
    b = acc_t(0);
    a = first_dropped;
  } else if (dropped && b == acc_t(0) && first_dropped < a) {
    b = acc_t(0);
    a = first_dropped;
  }
  best = b;
  arg = a;
}

// The maxes and arg-maxes of pair (i, j) over all its L + F rows and columns (layout of
// pair_max), from p: the pair's kept block (p.L, p.F: its kept counts; p.mt, p.mv: their
// masks). cb, ca: scratch [L + F].
template <typename acc_t>
void kept_max(const WtiPair<acc_t>& p, const Side<acc_t>& ts, int64_t i, const Side<acc_t>& vs, int64_t j,
              acc_t* best, int32_t* arg, acc_t* cb, int32_t* ca) {
  const int64_t L = ts.N, F = vs.N;
  if (p.L == L && p.F == F) return pair_max(p, best, arg);  // nothing dropped: the kept block is the pair
  std::fill(best, best + L + F, acc_t(0));
  std::fill(arg, arg + L + F, 0);
  if (p.L == 0 || p.F == 0) return;  // every entry is a dropped zero
  pair_max(p, cb, ca);
  const int32_t *tl = ts.tok.data() + ts.off[i], *tf = vs.tok.data() + vs.off[j];
  for (int64_t r = 0; r < p.L; ++r)
    with_dropped_zeros(cb[r], tf[ca[r]], p.F < F, vs.first_drop[j], best[tl[r]], arg[tl[r]]);
  for (int64_t c = 0; c < p.F; ++c)
    with_dropped_zeros(cb[p.L + c], tl[ca[p.L + c]], p.L < L, ts.first_drop[i], best[L + tf[c]],
                       arg[L + tf[c]]);
}

// pair (i, j)'s kept block in a tile of text block [i0, ..) x video block [j0, ..)
template <typename acc_t>
WtiPair<acc_t> kept_pair(const acc_t* tile, int64_t ld, const Side<acc_t>& ts, int64_t i, int64_t i0,
                         const Side<acc_t>& vs, int64_t j, int64_t j0) {
  return {tile + (ts.off[i] - ts.off[i0]) * ld + (vs.off[j] - vs.off[j0]),
          ld, ts.mask.data() + ts.off[i], vs.mask.data() + vs.off[j], nullptr, nullptr, ts.kept(i), vs.kept(j)};
}

// The products' operands: the side with fewer kept rows compacted whole, the other's
// blocks compacted per run into `scratch` (views where a block drops nothing and its rows
// already have the accumulation dtype), so that the tasks run with the large side's blocks
// outermost and each is compacted once per run. t2, v2: every token's rows ([Bt * L, D],
// [Bv * F, D]) in any float dtype.
template <typename acc_t>
struct TileOperands {
  const Side<acc_t>& ts;
  const Side<acc_t>& vs;
  at::Tensor t2, v2;
  bool t_small;
  at::Tensor small_rows, scratch;

  TileOperands(const Side<acc_t>& ts_, const Side<acc_t>& vs_, const at::Tensor& t2_, const at::Tensor& v2_,
               const at::TensorOptions& aopt, int64_t runs)
      : ts(ts_), vs(vs_), t2(t2_), v2(v2_), t_small(ts_.rows <= vs_.rows) {
    small_rows = t_small ? kept_whole(ts, t2, aopt) : kept_whole(vs, v2, aopt);
    const bool copies = large().dropped_any() || (t_small ? v2 : t2).scalar_type() != aopt.dtype().toScalarType();
    scratch = at::empty({runs, copies ? large().max_rows : 0, padded_ld(t2.size(1))}, aopt);
  }
  const Side<acc_t>& large() const { return t_small ? vs : ts; }
  int64_t n_inner() const { return t_small ? ts.nblocks() : vs.nblocks(); }
  // block k of the large side, for run r
  at::Tensor large_block(int64_t k, int64_t r) const {
    return t_small ? kept_block(vs, v2, k, scratch[r]) : kept_block(ts, t2, k, scratch[r]);
  }
  // the kept rows of text block tb and of video block vb (X: the large side's block, from
  // large_block of tb or of vb)
  at::Tensor text_rows(int64_t tb, const at::Tensor& X) const {
    return t_small ? small_rows.narrow(0, ts.off[ts.blocks[tb]], ts.off[ts.blocks[tb + 1]] - ts.off[ts.blocks[tb]])
                   : X;
  }
  at::Tensor video_rows(int64_t vb, const at::Tensor& X) const {
    return t_small ? X
                   : small_rows.narrow(0, vs.off[vs.blocks[vb]], vs.off[vs.blocks[vb + 1]] - vs.off[vs.blocks[vb]]);
  }
  // the raw products S [kept rows of text block tb, kept rows of video block vb] into buf
  at::Tensor product(int64_t tb, int64_t vb, const at::Tensor& X, const at::Tensor& buf) const {
    const at::Tensor T = text_rows(tb, X), V = video_rows(vb, X);
    at::Tensor S = buf.narrow(0, 0, T.size(0) * V.size(0)).view({T.size(0), V.size(0)});
    at::mm_out(S, T, V.t());
    return S;
  }
};

// s_ij from the pair's maxes (best: [L + F], rows then columns), in wti_pair_score's order
template <typename acc_t>
acc_t score_from_maxes(const acc_t* best, const acc_t* at, const acc_t* av, int64_t L, int64_t F) {
  acc_t t2v = 0, v2t = 0;
  for (int64_t l = 0; l < L; ++l) t2v += at[l] * best[l];
  for (int64_t f = 0; f < F; ++f) v2t += av[f] * best[L + f];
  return acc_t(0.5) * (t2v + v2t);
}

at::Tensor wti_similarity_cpu(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                              const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  const auto acc = wti_acc_type(t.scalar_type());
  auto out = at::empty({d.Bt, d.Bv}, t.options().dtype(acc));
  if (d.Bt == 0 || d.Bv == 0) return out;
  const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
  const auto t2 = p.t.view({d.Bt * d.L, d.D}), v2 = p.v.view({d.Bv * d.F, d.D});

  AT_DISPATCH_FLOATING_TYPES(acc, "wti_similarity_cpu", [&] {
    using acc_t = scalar_t;
    const auto [ts, vs] = make_sides<acc_t>(p, d, at::Tensor());
    const acc_t *wt = p.wt.const_data_ptr<acc_t>(), *wv = p.wv.const_data_ptr<acc_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const auto aopt = p.t.options().dtype(acc);
    const int64_t ntasks = ts.nblocks() * vs.nblocks();
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
    const TileOperands<acc_t> ops(ts, vs, t2, v2, aopt, runs);
    const int64_t n_inner = ops.n_inner();
    // one tile buffer per run, allocated here (no allocation on worker threads)
    at::Tensor tiles = at::empty({runs, ts.max_rows * vs.max_rows}, aopt);
    auto maxbuf = at::empty({runs, 2 * (d.L + d.F)}, aopt);
    auto argbuf = at::empty({runs, 2 * (d.L + d.F)}, aopt.dtype(at::kInt));
    at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
      at::NoGradGuard no_grad;
      for (int64_t r = rb; r < re; ++r) {
        acc_t* mb = maxbuf.mutable_data_ptr<acc_t>() + r * 2 * (d.L + d.F);
        int32_t* ab = argbuf.mutable_data_ptr<int32_t>() + r * 2 * (d.L + d.F);
        at::Tensor X;       // the large side's block
        int64_t x_at = -1;  // which
        for (int64_t task = ntasks * r / runs; task < ntasks * (r + 1) / runs; ++task) {
          const int64_t ob = task / n_inner, ib = task % n_inner;
          const int64_t tb = ops.t_small ? ib : ob, vb = ops.t_small ? ob : ib;
          if (ob != x_at) X = ops.large_block(ob, r);
          x_at = ob;
          const int64_t i0 = ts.blocks[tb], i1 = ts.blocks[tb + 1], j0 = vs.blocks[vb], j1 = vs.blocks[vb + 1];
          const at::Tensor S = ops.product(tb, vb, X, tiles[r]);
          const int64_t ld = S.size(1);
          const acc_t* s = S.const_data_ptr<acc_t>();
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = j0; j < j1; ++j) {
              kept_max(kept_pair(s, ld, ts, i, i0, vs, j, j0), ts, i, vs, j, mb, ab, mb + d.L + d.F,
                       ab + d.L + d.F);
              o[i * d.Bv + j] = score_from_maxes(mb, wt + i * d.L, wv + j * d.F, d.L, d.F);
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
// with entries gets y_r += sum_e c_e * x_{src_e}. D is walked in chunks (64 floats with
// AVX-512, then 32; 32 with AVX2), all rows per chunk, so that the chunk of every source
// row of the block (a few hundred rows) stays in L1/L2; compact source rows are padded to
// an odd number of cache lines (padded_ld) so that their chunks spread over the L1 sets.
// A row's chunk is held in registers over its entries, in 2 or 4 independent accumulator
// sets taking alternate entries, so that the loop is bound by loads, not by the FMA
// latency; the sets are added in a fixed order (deterministic, a different rounding than
// the plain sum of the generic path). x's rows are ldx apart, y's D. x may be fp16 or
// bf16 (S) while y is fp32: its values are converted as they are loaded (exactly), so
// that the tokens need no fp32 copy and the sums are those of the converted rows.
// `end[r]` is one past row r's last entry (row r starts at end[r - 1], 0 for r = 0).
template <typename T, typename S>
void gather_rows_base(T* __restrict y, const S* __restrict x, int64_t D, int64_t ldx, int64_t rows,
                      const int32_t* end, const T* c, const int32_t* src) {
  for (int64_t r = 0, b = 0; r < rows; b = end[r++])
    for (int64_t e = b; e < end[r]; ++e) {
      const S* xs = x + src[e] * ldx;
      T* yr = y + r * D;
      for (int64_t k = 0; k < D; ++k) yr[k] += c[e] * static_cast<T>(xs[k]);
    }
}
#if defined(__x86_64__)
// n <= 16 source values from p as floats (lanes past n are 0)
#define NBRETR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline
NBRETR_AVX512 __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
NBRETR_AVX512 __m512 load16(const c10::BFloat16* p, __mmask16 m) {  // bf16: the high half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
NBRETR_AVX512 __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
NBRETR_AVX512 __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
NBRETR_AVX512 __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
NBRETR_AVX512 __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#undef NBRETR_AVX512
#define NBRETR_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) inline
NBRETR_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
NBRETR_AVX2 __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
NBRETR_AVX2 __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#undef NBRETR_AVX2

template <typename S>
__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) void gather_rows_avx512(
    float* __restrict y, const S* __restrict x, int64_t D, int64_t ldx, int64_t rows, const int32_t* end,
    const float* c, const int32_t* src) {
  // 64 floats at a time (4 vectors in 2 accumulator sets, even and odd entries): fewer
  // scalar loads per FMA than 32 at a time, the chunk of every source row still in L1/L2
  const int64_t D64 = D / 64 * 64;
  for (int64_t k = 0; k < D64; k += 64) {
    const S* xk = x + k;
    for (int64_t r = 0, b = 0; r < rows; b = end[r++]) {
      const int64_t e1 = end[r];
      if (e1 == b) continue;
      float* yr = y + r * D + k;
      __m512 a[2][4];
      for (int q = 0; q < 4; ++q) a[0][q] = _mm512_loadu_ps(yr + 16 * q), a[1][q] = _mm512_setzero_ps();
      int64_t e = b;
      for (; e + 2 <= e1; e += 2)
        for (int u = 0; u < 2; ++u) {
          const __m512 ce = _mm512_set1_ps(c[e + u]);
          const S* xs = xk + src[e + u] * ldx;
          for (int q = 0; q < 4; ++q) a[u][q] = _mm512_fmadd_ps(ce, load16(xs + 16 * q), a[u][q]);
        }
      if (e < e1) {
        const __m512 ce = _mm512_set1_ps(c[e]);
        const S* xs = xk + src[e] * ldx;
        for (int q = 0; q < 4; ++q) a[0][q] = _mm512_fmadd_ps(ce, load16(xs + 16 * q), a[0][q]);
      }
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(yr + 16 * q, _mm512_add_ps(a[0][q], a[1][q]));
    }
  }
  for (int64_t k = D64; k < D; k += 32) {
    const int64_t w = std::min<int64_t>(32, D - k);
    const __mmask16 m0 = w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << w) - 1);
    const __mmask16 m1 = w >= 32 ? 0xFFFF : w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : 0;
    const S* xk = x + k;
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
            const S* xs = xk + src[e + u] * ldx;
            a[u] = _mm512_fmadd_ps(ce, load16(xs), a[u]);
            h[u] = _mm512_fmadd_ps(ce, load16(xs + 16), h[u]);
          }
      }
      for (; e < e1; ++e) {
        const __m512 ce = _mm512_set1_ps(c[e]);
        const S* xs = xk + src[e] * ldx;
        a[0] = _mm512_fmadd_ps(ce, load16(xs, m0), a[0]);
        h[0] = _mm512_fmadd_ps(ce, load16(xs + 16, m1), h[0]);
      }
      const __m512 lo = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
      const __m512 hi = _mm512_add_ps(_mm512_add_ps(h[0], h[1]), _mm512_add_ps(h[2], h[3]));
      _mm512_mask_storeu_ps(yr, m0, lo);
      _mm512_mask_storeu_ps(yr + 16, m1, hi);
    }
  }
}
template <typename S>
__attribute__((target("avx2,fma,f16c"), noinline)) void gather_rows_avx2(float* __restrict y, const S* __restrict x,
                                                                          int64_t D, int64_t ldx, int64_t rows,
                                                                          const int32_t* end, const float* c,
                                                                          const int32_t* src) {
  const int64_t D32 = D / 32 * 32;
  for (int64_t k = 0; k < D32; k += 32) {
    const S* xk = x + k;
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
          const S* xs = xk + src[e + u] * ldx;
          for (int q = 0; q < 4; ++q) a[u][q] = _mm256_fmadd_ps(ce, load8(xs + 8 * q), a[u][q]);
        }
      if (e < e1) {
        const __m256 ce = _mm256_set1_ps(c[e]);
        const S* xs = xk + src[e] * ldx;
        for (int q = 0; q < 4; ++q) a[0][q] = _mm256_fmadd_ps(ce, load8(xs + 8 * q), a[0][q]);
      }
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(yr + 8 * q, _mm256_add_ps(a[0][q], a[1][q]));
    }
  }
  if (D32 == D) return;
  for (int64_t r = 0, b = 0; r < rows; b = end[r++])
    for (int64_t e = b; e < end[r]; ++e)
      for (int64_t k = D32; k < D; ++k) y[r * D + k] += c[e] * static_cast<float>(x[src[e] * ldx + k]);
}
#endif

template <typename T, typename S>
using GatherFn = void (*)(T*, const S*, int64_t, int64_t, int64_t, const int32_t*, const T*, const int32_t*);
// the widest build the CPU runs for accumulators T and source rows S (S: T, or fp16/bf16
// with T = float)
template <typename T, typename S>
GatherFn<T, S> pick_gather() {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const int isa = cpu_isa_level();
    if (isa >= 2) return &gather_rows_avx512<S>;
    if (isa == 1) return &gather_rows_avx2<S>;
  }
#endif
  return &gather_rows_base<T, S>;
}

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
  // y[r] += sum of the entries of row r (rows of length D; x: the source rows, in the
  // accumulation dtype or fp16/bf16)
  template <typename S>
  void flush(acc_t* y, const S* x, int64_t D, int64_t ldx) {
    if (n == 0) return;
    std::fill(start, start + rows + 1, 0);
    for (int64_t e = 0; e < n; ++e) ++start[dst[e] + 1];
    for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
    for (int64_t e = 0; e < n; ++e) {
      const int32_t at = start[dst[e]]++;
      c_sorted[at] = c[e];
      src_sorted[at] = src[e];
    }
    static const GatherFn<acc_t, S> gather = pick_gather<acc_t, S>();
    gather(y, x, D, ldx, rows, start, c_sorted, src_sorted);  // start[r] is now the end of row r
    n = 0;
  }
};

// src_t: the tokens' dtype; gt and gv are in it, gwt and gwv in the accumulation dtype
template <typename src_t, typename idx_t>
void backward_impl(const WtiDims& d, const Prepared& p, const at::Tensor& grad, at::Tensor& gt, at::Tensor& gwt,
                   at::Tensor& gv, at::Tensor& gwv) {
  using acc_t = at::opmath_type<src_t>;
  const int64_t L = d.L, F = d.F, D = d.D, Bt = d.Bt, Bv = d.Bv;
  const acc_t* gp = grad.const_data_ptr<acc_t>();
  const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
  const acc_t *wt = p.wt.const_data_ptr<acc_t>(), *wv = p.wv.const_data_ptr<acc_t>();
  const auto aopt = p.mt.options();
  const auto t2 = p.t.view({Bt * L, D}), v2 = p.v.view({Bv * F, D});
  const auto idx_dtype = sizeof(idx_t) == 1 ? at::kByte : at::kInt;
  const auto [ts, vs] = make_sides<acc_t>(p, d, grad);
  // 1) one GEMM recompute over the kept tokens: the arg-maxes of every pair ([Bt, Bv, L]
  //    and [Bt, Bv, F], token indices) and the weight gradients (run-local, summed in run
  //    order: deterministic per thread count)
  auto AR = at::empty({Bt, Bv, L}, aopt.dtype(idx_dtype));
  auto AC = at::empty({Bt, Bv, F}, aopt.dtype(idx_dtype));
  idx_t* arp = static_cast<idx_t*>(AR.data_ptr());
  idx_t* acp = static_cast<idx_t*>(AC.data_ptr());
  const int64_t nbt = ts.nblocks(), nbv = vs.nblocks(), ntasks = nbt * nbv;
  const int64_t nthreads = at::get_num_threads();
  // fused: enough text blocks to split them among threads, so each thread owns its texts'
  // dL/dt rows and adds them while the tile's videos are still in cache
  const bool fused = nbt >= 2 * nthreads;
  const int64_t runs = fused ? nthreads : std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  // per run: one S tile, the maxes and arg-maxes of one pair, the entries of one block of
  // pairs bucketed by text row or by video row: a pair has a nonzero coefficient only at
  // a kept token's row or a kept frame's column, so a block has at most
  // (its videos) x (its kept text rows) + (its texts) x (its kept video rows) entries
  const int64_t cap = vs.max_items * ts.max_rows + ts.max_items * vs.max_rows;
  const int64_t sum_rows = std::max(ts.max_items * L, vs.max_items * F);
  const int64_t sums_bytes = RowSums<acc_t>::bytes(sum_rows, cap);
  at::Tensor tiles = at::empty({runs, ts.max_rows * vs.max_rows}, aopt);
  auto lwt = at::zeros({fused ? 1 : runs, Bt * L}, aopt);
  auto lwv = at::zeros({runs, Bv * F}, aopt);
  auto maxbuf = at::empty({runs, 2 * (L + F)}, aopt);
  auto argbuf = at::empty({runs, 2 * (L + F)}, aopt.dtype(at::kInt));
  at::Tensor coefbuf = at::empty({runs, L}, aopt);
  at::Tensor sums_mem = at::empty({runs, sums_bytes}, aopt.dtype(at::kByte));
  // the products' operands (fp16/bf16 tokens converted as they are compacted)
  std::optional<TileOperands<acc_t>> ops(std::in_place, ts, vs, t2, v2, aopt, runs);
  const bool t_small = ops->t_small;
  // fp16/bf16 tokens are never copied whole: the row sums read them as they are (converted
  // on load), each video block's dL/dv is summed in gscr and each text block's dL/dt in
  // gtscr (fp32, per run), then written to gv and gt in the tokens' dtype. Only when a
  // run adds to its texts' dL/dt over all its tasks (fused, texts compacted whole, so the
  // video blocks are outermost) is dL/dt summed whole, in gt_whole.
  const src_t* tp = p.t.const_data_ptr<src_t>();
  const src_t* vp = p.v.const_data_ptr<src_t>();
  const at::Tensor gscr = p.low ? at::empty({runs, vs.max_items * F, D}, aopt) : at::Tensor();
  const bool dt_whole = !p.low || (fused && t_small);
  const at::Tensor gt_acc = !p.low ? gt : dt_whole ? at::zeros({Bt, L, D}, aopt) : at::Tensor();
  const at::Tensor gtscr = dt_whole ? at::Tensor() : at::empty({runs, ts.max_items * L, D}, aopt);
  acc_t* gt_whole = dt_whole ? gt_acc.mutable_data_ptr<acc_t>() : nullptr;
  auto gt2 = gt.view({Bt * L, D});
  // where run r sums text block tb's dL/dt (zeroed scratch, or its rows of gt_whole), and
  // its rows written to gt once complete
  auto text_sums = [&](int64_t r, int64_t tb) -> acc_t* {
    const int64_t i0 = ts.blocks[tb], n = (ts.blocks[tb + 1] - i0) * L;
    if (dt_whole) return gt_whole + i0 * L * D;
    acc_t* y = gtscr[r].mutable_data_ptr<acc_t>();
    std::fill(y, y + n * D, acc_t(0));
    return y;
  };
  auto text_done = [&](int64_t r, int64_t tb) {
    const int64_t i0 = ts.blocks[tb], n = (ts.blocks[tb + 1] - i0) * L;
    if (!dt_whole) gt2.narrow(0, i0 * L, n).copy_(gtscr[r].narrow(0, 0, n));
  };
  auto run_sums = [&](int64_t r, int64_t rows) {
    return RowSums<acc_t>(static_cast<char*>(sums_mem[r].data_ptr()), rows, cap);
  };
  // Every nonzero (text token l, frame f, coefficient c) of pair (i, j)'s gradient,
  // from its arg-maxes, coefficients wti_row_coef / wti_col_coef (csrc/common/wti.h):
  // dL/dt_il += c v_jf and dL/dv_jf += c t_il; the dL/dt and the dL/dv sums walk the
  // same entries. Where column f's arg-max l is also row l's arg-max (about a fifth of
  // the entries on random data), the two coefficients are added first (row's + column's,
  // as the torch path's dS entry) and the entry is visited once. cr: scratch [L].
  auto for_each_coef = [&](int64_t i, int64_t j, acc_t hg, acc_t* cr, auto&& visit) {
    const idx_t* ar = arp + (i * Bv + j) * L;
    const idx_t* ac = acp + (i * Bv + j) * F;
    const WtiPair<acc_t> pair{nullptr, 0, mt + i * L, mv + j * F, wt + i * L, wv + j * F, L, F};  // no S needed
    for (int64_t l = 0; l < L; ++l) cr[l] = wti_row_coef(pair, hg, l, static_cast<int64_t>(ar[l]));
    for (int64_t f = 0; f < F; ++f) {
      const int64_t a = ac[f];
      const acc_t c = wti_col_coef(pair, hg, a, f);
      if (static_cast<int64_t>(ar[a]) == f)
        cr[a] += c;
      else if (c != acc_t(0))
        visit(a, f, c);
    }
    for (int64_t l = 0; l < L; ++l)
      if (cr[l] != acc_t(0)) visit(l, static_cast<int64_t>(ar[l]), cr[l]);
  };
  // dL/dt (to_text) or dL/dv rows of one block of pairs (text block tb x video block vb)
  // from the stored arg-maxes, added into the block's rows at y; x: the block's source
  // rows (for dL/dt its videos', compact when `kept_src`, else every frame; for dL/dv
  // its texts', every token), in the accumulation dtype or the tokens'. A nonzero
  // coefficient's frame is kept (its mask is not 0).
  auto add_block = [&](int64_t r, bool to_text, int64_t tb, int64_t vb, acc_t* y, const auto* x, int64_t ldx,
                       bool kept_src) {
    const int64_t i0 = ts.blocks[tb], i1 = ts.blocks[tb + 1], j0 = vs.blocks[vb], j1 = vs.blocks[vb + 1];
    RowSums<acc_t> sums = run_sums(r, to_text ? (i1 - i0) * L : (j1 - j0) * F);
    acc_t* cbuf = coefbuf.mutable_data_ptr<acc_t>() + r * L;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t g = gp[i * Bv + j];
        if (g == acc_t(0)) continue;
        const int64_t jk = vs.off[j] - vs.off[j0];
        for_each_coef(i, j, acc_t(0.5) * g, cbuf, [&](int64_t l, int64_t f, acc_t c) {
          if (to_text)
            sums.add((i - i0) * L + l, kept_src ? jk + vs.pos[j * F + f] : (j - j0) * F + f, c);
          else
            sums.add((j - j0) * F + f, (i - i0) * L + l, c);
        });
      }
    sums.flush(y, x, D, ldx);
  };
  // dt: where the tile's texts' dL/dt is summed when fused (from text_sums), else null
  auto do_task = [&](int64_t tb, int64_t vb, int64_t r, const at::Tensor& X, acc_t* gwt_r, acc_t* dt) {
    acc_t* gwv_r = lwv.mutable_data_ptr<acc_t>() + r * Bv * F;
    acc_t* mb = maxbuf.mutable_data_ptr<acc_t>() + r * 2 * (L + F);
    int32_t* ab = argbuf.mutable_data_ptr<int32_t>() + r * 2 * (L + F);
    const int64_t i0 = ts.blocks[tb], i1 = ts.blocks[tb + 1], j0 = vs.blocks[vb], j1 = vs.blocks[vb + 1];
    const at::Tensor S = ops->product(tb, vb, X, tiles[r]);
    const int64_t ld = S.size(1);
    const acc_t* s = S.const_data_ptr<acc_t>();
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t g = gp[i * Bv + j];
        if (g == acc_t(0)) continue;  // the dL/dt and dL/dv passes skip the pair too
        const acc_t hg = acc_t(0.5) * g;
        kept_max(kept_pair(s, ld, ts, i, i0, vs, j, j0), ts, i, vs, j, mb, ab, mb + L + F, ab + L + F);
        idx_t* ar = arp + (i * Bv + j) * L;
        idx_t* ac = acp + (i * Bv + j) * F;
        for (int64_t l = 0; l < L; ++l) {
          ar[l] = static_cast<idx_t>(ab[l]);
          gwt_r[i * L + l] += hg * mb[l];
        }
        for (int64_t f = 0; f < F; ++f) {
          ac[f] = static_cast<idx_t>(ab[L + f]);
          gwv_r[j * F + f] += hg * mb[L + f];
        }
      }
    if (fused) {  // dL/dt of the tile's texts while its videos are in cache
      const at::Tensor V = ops->video_rows(vb, X);
      add_block(r, true, tb, vb, dt, V.const_data_ptr<acc_t>(), V.stride(0), true);
    }
  };
  if (fused) {
    // text blocks split among threads (at::parallel_for's static split: deterministic
    // for a given thread count); gwt rows are owned, gwv is thread-local. A thread's
    // tasks run with the large side's blocks outermost; either way each text row and
    // each weight sees its videos in ascending order.
    at::parallel_for(0, nbt, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;
      // (clamped: a nested call runs inline on one thread whatever its number)
      const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
      acc_t* gwt_r = gwt.mutable_data_ptr<acc_t>();
      if (t_small) {  // (dt_whole)
        for (int64_t vb = 0; vb < nbv; ++vb) {
          const at::Tensor X = ops->large_block(vb, r);
          for (int64_t tb = b0; tb < b1; ++tb) do_task(tb, vb, r, X, gwt_r, gt_whole + ts.blocks[tb] * L * D);
        }
      } else {
        for (int64_t tb = b0; tb < b1; ++tb) {
          const at::Tensor X = ops->large_block(tb, r);
          acc_t* dt = text_sums(r, tb);
          for (int64_t vb = 0; vb < nbv; ++vb) do_task(tb, vb, r, X, gwt_r, dt);
          text_done(r, tb);
        }
      }
    });
  } else {
    const int64_t n_inner = ops->n_inner();
    at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
      at::NoGradGuard no_grad;
      for (int64_t r = rb; r < re; ++r) {
        at::Tensor X;
        int64_t x_at = -1;
        for (int64_t task = ntasks * r / runs; task < ntasks * (r + 1) / runs; ++task) {
          const int64_t ob = task / n_inner, ib = task % n_inner;
          if (ob != x_at) X = ops->large_block(ob, r);
          x_at = ob;
          do_task(t_small ? ib : ob, t_small ? ob : ib, r, X, lwt.mutable_data_ptr<acc_t>() + r * Bt * L, nullptr);
        }
      }
    });
    gwt.view({Bt * L}).copy_(lwt.sum(0));
  }
  gwv.view({Bv * F}).copy_(lwv.sum(0));
  tiles = at::Tensor();
  ops.reset();  // the compact operands are not needed by the sums below

  // 2) dL/dt (unless fused above) and dL/dv from the arg-maxes, block by block: texts are
  //    split among threads for dL/dt and videos for dL/dv (one writer per row), no dense dS
  if (!fused) {
    at::parallel_for(0, nbt, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
      for (int64_t tb = b0; tb < b1; ++tb) {
        acc_t* dt = text_sums(r, tb);
        for (int64_t vb = 0; vb < nbv; ++vb) add_block(r, true, tb, vb, dt, vp + vs.blocks[vb] * F * D, D, false);
        text_done(r, tb);
      }
    });
  }
  auto gv2 = gv.view({Bv * F, D});
  at::parallel_for(0, nbv, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r = std::min<int64_t>(at::get_thread_num(), runs - 1);
    for (int64_t vb = b0; vb < b1; ++vb) {
      const int64_t j0 = vs.blocks[vb], nv = vs.blocks[vb + 1] - j0;
      acc_t* y = p.low ? gscr[r].mutable_data_ptr<acc_t>() : gv2.mutable_data_ptr<acc_t>() + j0 * F * D;
      if (p.low) std::fill(y, y + nv * F * D, acc_t(0));
      for (int64_t tb = 0; tb < nbt; ++tb) add_block(r, false, tb, vb, y, tp + ts.blocks[tb] * L * D, D, false);
      if (p.low) gv2.narrow(0, j0 * F, nv * F).copy_(gscr[r].narrow(0, 0, nv * F));
    }
  });
  if (p.low && dt_whole) gt.copy_(gt_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wti_similarity_backward_cpu(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
    const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  check_wti_grad(grad, d, t);
  at::NoGradGuard no_grad;
  const auto acc = wti_acc_type(t.scalar_type());
  auto gt = at::zeros({d.Bt, d.L, d.D}, t.options());  // summed in the accumulation dtype, by
  auto gv = at::zeros({d.Bv, d.F, d.D}, v.options());  // blocks where the tokens' is narrower
  auto gwt = at::zeros({d.Bt, d.L}, t.options().dtype(acc));
  auto gwv = at::zeros({d.Bv, d.F}, t.options().dtype(acc));
  if (d.Bt > 0 && d.Bv > 0 && d.D > 0) {  // D == 0: every gradient is 0
    const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
    const at::Tensor g = grad.to(acc).contiguous();  // (checked by make_sides before tokens are dropped)
    const bool small = std::max(d.L, d.F) <= 256;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "wti_similarity_backward_cpu", [&] {
      static_assert(std::is_same_v<at::opmath_type<scalar_t>, float> || std::is_same_v<scalar_t, double>);
      if (small)
        backward_impl<scalar_t, uint8_t>(d, p, g, gt, gwt, gv, gwv);
      else
        backward_impl<scalar_t, int32_t>(d, p, g, gt, gwt, gv, gwv);
    });
  }
  return {gt, gwt.to(t_weight.scalar_type()), gv, gwv.to(v_weight.scalar_type())};
}

// ---- test hook: the GPU's tiled driver (csrc/common/wti_tiled.h) with host loops in
// place of its per-line kernels, so that the CPU tests check its tiling, work numbering
// and gradient algebra.

struct HostLaunch {
  template <typename acc_t>
  void maxes(const WtiTileArgs<acc_t>& a) {
    for (int64_t q = 0; q < a.row_items(); ++q) wti_tile_row_max(a, q);
    for (int64_t q = 0; q < a.col_items(); ++q) wti_tile_col_max(a, q);
  }
  template <typename acc_t>
  void scores(const WtiTileArgs<acc_t>& a) {
    for (int64_t p = 0; p < a.pairs(); ++p) wti_tile_score(a, p);
  }
  template <typename acc_t>
  void row_grads(const WtiTileArgs<acc_t>& a) {
    for (int64_t q = 0; q < a.row_items(); ++q) wti_tile_row_grad(a, q);
  }
  template <typename acc_t>
  void col_grads(const WtiTileArgs<acc_t>& a) {
    for (int64_t q = 0; q < a.col_items(); ++q) wti_tile_col_grad(a, q);
  }
};

void check_tile(int64_t tile_rows, int64_t tile_cols) {
  NBRETR_CHECK_ARG(tile_rows >= 1 && tile_cols >= 1, "testing.wti_tiled", "tile_rows and tile_cols must be >= 1, got ",
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

at::Tensor wti_cpu_plan(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                        const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                        const std::optional<at::Tensor>& grad) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CPU);
  const auto acc = wti_acc_type(t.scalar_type());
  at::Tensor g;
  if (grad.has_value()) {
    check_wti_grad(*grad, d, t);
    g = grad->to(acc).contiguous();
  }
  const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
  std::vector<int64_t> plan;
  AT_DISPATCH_FLOATING_TYPES(acc, "wti_cpu_plan", [&] {
    const auto [ts, vs] = make_sides<scalar_t>(p, d, g);
    plan = {ts.rows, vs.rows, ts.nblocks(), vs.nblocks()};
  });
  return at::tensor(plan, at::kLong);
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) {
  m.impl("wti_similarity", &wti_similarity_cpu);
  m.impl("wti_similarity_backward", &wti_similarity_backward_cpu);
}

void testing::define_wti_hooks(torch::Library& m) {
  // The CUDA backend's tiled driver (csrc/common/wti_tiled.h) run with a host loop per tile
  // and the given tile size, so that the CPU tests check it.
  m.def("wti_tiled(Tensor t, Tensor t_mask, Tensor t_weight, Tensor v, Tensor v_mask, Tensor v_weight, "
        "int tile_rows, int tile_cols) -> Tensor");
  m.def("wti_tiled_backward(Tensor grad, Tensor t, Tensor t_mask, Tensor t_weight, Tensor v, Tensor v_mask, "
        "Tensor v_weight, int tile_rows, int tile_cols) -> (Tensor, Tensor, Tensor, Tensor)");
  // How the CPU kernel would cut these inputs: int64 [kept text tokens, kept video frames,
  // text blocks, video blocks] (masked tokens are dropped from the products where that is
  // exact; grad: the backward's upstream gradient, if any).
  m.def("wti_cpu_plan(Tensor t, Tensor t_mask, Tensor t_weight, Tensor v, Tensor v_mask, Tensor v_weight, "
        "Tensor? grad) -> Tensor");
  m.impl("wti_tiled", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(wti_tiled_cpu)));
  m.impl("wti_tiled_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(wti_tiled_backward_cpu)));
  m.impl("wti_cpu_plan", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(wti_cpu_plan)));
}

}  // namespace nbretr
