// The tiled driver of wti_similarity on the GPU: every tile of raw dot products
// S = t_block @ v_block^T ([nt*L, nv*F], accumulation dtype) is one library matrix
// product (cuBLAS through at::mm_out); the max-and-weigh step of csrc/common/wti.h then
// runs with one thread per line of a pair's [L, F] block (a row l over its F frames, or a
// column f over its L tokens), so that a tile of a few thousand pairs still fills the GPU:
//
//   forward:  every line writes its max into M [pairs, L + F] (rows, then columns);
//             then one thread per pair weighs them: out[i, j] = wti_pair_score's sum;
//   backward: per tile, recompute S; every row writes its weight gradient (rw) and its
//             arg-max coefficient into dS (zeroed; a row's own entry), then every column
//             its weight gradient (cw) and adds its coefficient into dS (after the rows:
//             where a row's and a column's arg-max meet, row's + column's, as every
//             backend adds them); dt_block += dS @ v_block and dv_block += dS^T @ t_block
//             (two more products), d t_weight += rw summed over the tile's videos, d
//             v_weight likewise.
//
// Lines are numbered so that neighbouring threads read neighbouring memory: row work q is
// (tile row r = q / nv, video jj = q % nv), column work q is (text ii = q / (nv F), tile
// column q % (nv F)). Every line writes its own outputs (no races, no atomics), and the
// values are those of the per-pair scans (wti_row_max, wti_col_max), bit for bit.
//
// Memory: one S tile (and one dS tile in the backward) of at most tile_rows x tile_cols
// entries, never [Bt, Bv, L, F]. The launcher (CUDA kernels, or host loops for the CPU
// test hook `nbretr_testing.wti_tiled`, csrc/testing.h) only runs the numbered work items
// below in the stated order.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "common/macros.h"
#include "common/torch_compat.h"
#include "common/wti.h"
#include "common/wti_checks.h"

namespace nbretr {

template <typename acc_t>
struct WtiTileArgs {
  const acc_t* S;  // the tile [nt * L, nv * F], row stride ld = nv * F
  int64_t ld, i0, nt, j0, nv, L, F, Bv;
  const acc_t *mt, *mv, *wt, *wv;  // masks and weights of all texts [Bt, L] / videos [Bv, F]
  const acc_t* g;                  // backward: upstream gradient [Bt, Bv]
  acc_t* out;                      // forward: similarities [Bt, Bv]
  acc_t* M;                        // forward: every pair's maxes [nt * nv, L + F]
  acc_t *dS, *rw, *cw;             // backward: dS like S (zeroed), rw [nt, nv, L], cw [nt, nv, F]

  NBRETR_HD int64_t row_items() const { return nt * L * nv; }
  NBRETR_HD int64_t col_items() const { return nt * nv * F; }
  NBRETR_HD int64_t pairs() const { return nt * nv; }
};

// pair p = ii * nv + jj of the tile (text i0 + ii, video j0 + jj)
template <typename acc_t>
NBRETR_HD WtiPair<acc_t> wti_tile_pair(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t ii = p / a.nv, jj = p % a.nv, i = a.i0 + ii, j = a.j0 + jj;
  return {a.S + ii * a.L * a.ld + jj * a.F, a.ld, a.mt + i * a.L, a.mv + j * a.F, a.wt + i * a.L,
          a.wv + j * a.F, a.L, a.F};
}

// row work q: its pair and row
template <typename acc_t>
NBRETR_HD void wti_tile_row_item(const WtiTileArgs<acc_t>& a, int64_t q, int64_t& p, int64_t& l) {
  const int64_t r = q / a.nv, jj = q % a.nv;
  p = (r / a.L) * a.nv + jj;
  l = r % a.L;
}
// column work q: its pair and column
template <typename acc_t>
NBRETR_HD void wti_tile_col_item(const WtiTileArgs<acc_t>& a, int64_t q, int64_t& p, int64_t& f) {
  const int64_t cols = a.nv * a.F, ii = q / cols, c = q % cols;
  p = ii * a.nv + c / a.F;
  f = c % a.F;
}

// forward, any order: row work q (q < row_items()), column work q (q < col_items())
template <typename acc_t>
NBRETR_HD void wti_tile_row_max(const WtiTileArgs<acc_t>& a, int64_t q) {
  int64_t p, l, arg;
  wti_tile_row_item(a, q, p, l);
  wti_row_max(wti_tile_pair(a, p), l, a.M[p * (a.L + a.F) + l], arg);
}
template <typename acc_t>
NBRETR_HD void wti_tile_col_max(const WtiTileArgs<acc_t>& a, int64_t q) {
  int64_t p, f, arg;
  wti_tile_col_item(a, q, p, f);
  wti_col_max(wti_tile_pair(a, p), f, a.M[p * (a.L + a.F) + a.L + f], arg);
}
// forward, after the maxes: pair p's similarity, summed in wti_pair_score's order
template <typename acc_t>
NBRETR_HD void wti_tile_score(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t i = a.i0 + p / a.nv, j = a.j0 + p % a.nv;
  const acc_t* m = a.M + p * (a.L + a.F);
  const acc_t *at = a.wt + i * a.L, *av = a.wv + j * a.F;
  acc_t t2v = 0, v2t = 0;
  for (int64_t l = 0; l < a.L; ++l) t2v += at[l] * m[l];
  for (int64_t f = 0; f < a.F; ++f) v2t += av[f] * m[a.L + f];
  a.out[i * a.Bv + j] = acc_t(0.5) * (t2v + v2t);
}

// backward: every row work item, then every column work item (which adds onto the rows'
// entries of dS). A work item's pair: its block of S, g / 2, its block of dS.
template <typename acc_t>
struct WtiTileGradPair {
  WtiPair<acc_t> pair;
  acc_t half_g;
  acc_t* dS;  // the pair's [L, F] block of dS (row stride ld)
};
template <typename acc_t>
NBRETR_HD WtiTileGradPair<acc_t> wti_tile_grad_pair(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t ii = p / a.nv, jj = p % a.nv;
  return {wti_tile_pair(a, p), acc_t(0.5) * a.g[(a.i0 + ii) * a.Bv + a.j0 + jj],
          a.dS + ii * a.L * a.ld + jj * a.F};
}
template <typename acc_t>
NBRETR_HD void wti_tile_row_grad(const WtiTileArgs<acc_t>& a, int64_t q) {
  int64_t p, l, arg;
  wti_tile_row_item(a, q, p, l);
  const WtiTileGradPair<acc_t> w = wti_tile_grad_pair(a, p);
  acc_t m;
  wti_row_max(w.pair, l, m, arg);
  a.rw[p * a.L + l] = w.half_g * m;
  const acc_t c = wti_row_coef(w.pair, w.half_g, l, arg);
  if (c != acc_t(0)) w.dS[l * a.ld + arg] += c;
}
template <typename acc_t>
NBRETR_HD void wti_tile_col_grad(const WtiTileArgs<acc_t>& a, int64_t q) {
  int64_t p, f, arg;
  wti_tile_col_item(a, q, p, f);
  const WtiTileGradPair<acc_t> w = wti_tile_grad_pair(a, p);
  acc_t m;
  wti_col_max(w.pair, f, m, arg);
  a.cw[p * a.F + f] = w.half_g * m;
  const acc_t c = wti_col_coef(w.pair, w.half_g, arg, f);
  if (c != acc_t(0)) w.dS[arg * a.ld + f] += c;
}

// ---- host driver ---------------------------------------------------------------------

struct WtiTiling {
  int64_t TB, VB;  // texts and videos per tile
};

// About tile_rows text tokens by tile_cols video frames per tile; when one side has fewer
// (a few queries against many videos, say), the other side takes the rest of the
// tile_rows * tile_cols budget, so that small batches still make few, large products.
inline WtiTiling wti_tiling(const WtiDims& d, int64_t tile_rows, int64_t tile_cols) {
  const int64_t budget = tile_rows * tile_cols;
  const auto clamp = [](int64_t x, int64_t hi) { return std::max<int64_t>(1, std::min(x, hi)); };
  const int64_t tb = clamp(tile_rows / d.L, d.Bt);
  const int64_t vb = clamp(budget / (tb * d.L * d.F), d.Bv);
  return {clamp(budget / (vb * d.F * d.L), d.Bt), vb};
}

// S = a @ b^T into S (accumulation dtype). Half inputs: with out_dtype where the caller
// says the backend has it (CUDA, torch >= 2.9), else the inputs were upcast beforehand.
inline void wti_tile_mm(at::Tensor& S, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != S.scalar_type()) {
#if NBRETR_HAS_MM_OUT_DTYPE
    at::mm_out(S, a, b.t(), S.scalar_type());
#else
    TORCH_CHECK(false, "nbretr.wti_similarity: fp16/bf16 tiles need torch >= 2.9 (mm with out_dtype)");
#endif
  } else {
    at::mm_out(S, a, b.t());
  }
}

// The driver's inputs: t and v as [Bt*L, D] / [Bv*F, D] rows in the product's dtype (the
// inputs' own fp16/bf16 where half_mm, else the accumulation dtype), masks and weights in
// the accumulation dtype, and the tiling.
struct WtiTiledInputs {
  at::ScalarType acc;
  at::Tensor t2, v2, mt, mv, wt, wv;
  WtiTiling tl;
};

inline WtiTiledInputs wti_tiled_inputs(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                                       const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                                       const WtiDims& d, int64_t tile_rows, int64_t tile_cols, bool half_mm) {
  const auto acc = wti_acc_type(t.scalar_type());
  const auto mm_dtype = half_mm ? t.scalar_type() : acc;
  return {acc,
          t.to(mm_dtype).contiguous().view({d.Bt * d.L, d.D}),
          v.to(mm_dtype).contiguous().view({d.Bv * d.F, d.D}),
          t_mask.to(acc).contiguous(),
          v_mask.to(acc).contiguous(),
          t_weight.to(acc).contiguous(),
          v_weight.to(acc).contiguous(),
          wti_tiling(d, tile_rows, tile_cols)};
}

// Calls fn(i0, nt, j0, nv) for every tile, texts outer.
template <typename Fn>
void wti_for_each_tile(const WtiDims& d, const WtiTiling& tl, Fn&& fn) {
  for (int64_t i0 = 0; i0 < d.Bt; i0 += tl.TB) {
    for (int64_t j0 = 0; j0 < d.Bv; j0 += tl.VB) fn(i0, std::min(tl.TB, d.Bt - i0), j0, std::min(tl.VB, d.Bv - j0));
  }
}

// Launch: a struct with, each templated on acc_t and taking const WtiTileArgs<acc_t>& a,
//   maxes(a):     wti_tile_row_max for q < a.row_items(), wti_tile_col_max for q < a.col_items()
//   scores(a):    wti_tile_score for p < a.pairs(), after maxes
//   row_grads(a): wti_tile_row_grad for q < a.row_items()
//   col_grads(a): wti_tile_col_grad for q < a.col_items(), after row_grads
// half_mm: the GEMM may take fp16/bf16 inputs with an fp32 output (else t and v are upcast
// first).
template <typename Launch>
at::Tensor wti_tiled_forward(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                             const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                             const WtiDims& d, int64_t tile_rows, int64_t tile_cols, bool half_mm, Launch& launch) {
  auto out = at::empty({d.Bt, d.Bv}, t.options().dtype(wti_acc_type(t.scalar_type())));
  if (d.Bt == 0 || d.Bv == 0) return out;
  const WtiTiledInputs in = wti_tiled_inputs(t, t_mask, t_weight, v, v_mask, v_weight, d, tile_rows, tile_cols, half_mm);
  auto buf = at::empty({in.tl.TB * d.L * in.tl.VB * d.F}, t.options().dtype(in.acc));
  auto mbuf = at::empty({in.tl.TB * in.tl.VB * (d.L + d.F)}, t.options().dtype(in.acc));
  AT_DISPATCH_FLOATING_TYPES(in.acc, "wti_tiled_forward", [&] {
    wti_for_each_tile(d, in.tl, [&](int64_t i0, int64_t nt, int64_t j0, int64_t nv) {
      at::Tensor S = buf.narrow(0, 0, nt * d.L * nv * d.F).view({nt * d.L, nv * d.F});
      wti_tile_mm(S, in.t2.narrow(0, i0 * d.L, nt * d.L), in.v2.narrow(0, j0 * d.F, nv * d.F));
      WtiTileArgs<scalar_t> a{S.const_data_ptr<scalar_t>(), nv * d.F, i0, nt, j0, nv, d.L, d.F, d.Bv,
                              in.mt.const_data_ptr<scalar_t>(), in.mv.const_data_ptr<scalar_t>(),
                              in.wt.const_data_ptr<scalar_t>(), in.wv.const_data_ptr<scalar_t>(), nullptr,
                              out.mutable_data_ptr<scalar_t>(), mbuf.mutable_data_ptr<scalar_t>(), nullptr,
                              nullptr, nullptr};
      launch.template maxes<scalar_t>(a);
      launch.template scores<scalar_t>(a);
    });
  });
  return out;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wti_tiled_backward(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
    const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight, const WtiDims& d, int64_t tile_rows,
    int64_t tile_cols, bool half_mm, Launch& launch) {
  if (d.Bt == 0 || d.Bv == 0 || d.D == 0) {
    return {at::zeros_like(t, at::MemoryFormat::Contiguous), at::zeros_like(t_weight, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous), at::zeros_like(v_weight, at::MemoryFormat::Contiguous)};
  }
  const WtiTiledInputs in = wti_tiled_inputs(t, t_mask, t_weight, v, v_mask, v_weight, d, tile_rows, tile_cols, half_mm);
  const auto opts = t.options().dtype(in.acc);
  // the gradient products run in the accumulation dtype (dS is not rounded to fp16/bf16)
  const auto t2a = in.t2.to(in.acc), v2a = in.v2.to(in.acc);
  const auto g = grad.to(in.acc).contiguous();
  auto gt = at::zeros({d.Bt * d.L, d.D}, opts), gv = at::zeros({d.Bv * d.F, d.D}, opts);
  auto gwt = at::zeros({d.Bt, d.L}, opts), gwv = at::zeros({d.Bv, d.F}, opts);
  const int64_t TB = in.tl.TB, VB = in.tl.VB;
  auto sbuf = at::empty({TB * d.L * VB * d.F}, opts), dbuf = at::empty_like(sbuf);
  auto rwbuf = at::empty({TB * VB * d.L}, opts), cwbuf = at::empty({TB * VB * d.F}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "wti_tiled_backward", [&] {
    wti_for_each_tile(d, in.tl, [&](int64_t i0, int64_t nt, int64_t j0, int64_t nv) {
      const int64_t rows = nt * d.L, cols = nv * d.F;
      at::Tensor S = sbuf.narrow(0, 0, rows * cols).view({rows, cols});
      at::Tensor dS = dbuf.narrow(0, 0, rows * cols).view({rows, cols});
      at::Tensor rw = rwbuf.narrow(0, 0, nt * nv * d.L).view({nt, nv, d.L});
      at::Tensor cw = cwbuf.narrow(0, 0, nt * nv * d.F).view({nt, nv, d.F});
      wti_tile_mm(S, in.t2.narrow(0, i0 * d.L, rows), in.v2.narrow(0, j0 * d.F, cols));
      dS.zero_();
      WtiTileArgs<scalar_t> a{S.const_data_ptr<scalar_t>(), cols, i0, nt, j0, nv, d.L, d.F, d.Bv,
                              in.mt.const_data_ptr<scalar_t>(), in.mv.const_data_ptr<scalar_t>(),
                              in.wt.const_data_ptr<scalar_t>(), in.wv.const_data_ptr<scalar_t>(),
                              g.const_data_ptr<scalar_t>(), nullptr, nullptr, dS.mutable_data_ptr<scalar_t>(),
                              rw.mutable_data_ptr<scalar_t>(), cw.mutable_data_ptr<scalar_t>()};
      launch.template row_grads<scalar_t>(a);
      launch.template col_grads<scalar_t>(a);  // after the rows: adds onto their dS entries
      gt.narrow(0, i0 * d.L, rows).addmm_(dS, v2a.narrow(0, j0 * d.F, cols));
      gv.narrow(0, j0 * d.F, cols).addmm_(dS.t(), t2a.narrow(0, i0 * d.L, rows));
      gwt.narrow(0, i0, nt).add_(rw.sum(1));
      gwv.narrow(0, j0, nv).add_(cw.sum(0));
    });
  });
  return {gt.view({d.Bt, d.L, d.D}).to(t.scalar_type()), gwt.to(t_weight.scalar_type()),
          gv.view({d.Bv, d.F, d.D}).to(v.scalar_type()), gwv.to(v_weight.scalar_type())};
}

}  // namespace nbretr
