// The tiled driver of wti_similarity on the GPU: every tile of raw dot products
// S = t_block @ v_block^T ([nt*L, nv*F], accumulation dtype) is one library matrix
// product (cuBLAS through at::mm_out), and one thread per (text, video) pair of the tile
// runs the max-and-weigh step of csrc/common/wti.h on its [L, F] block of S.
//
//   forward:  out[i, j] = wti_pair_score(pair)
//   backward: per tile, recompute S; each pair writes its weight gradients (rw, cw) and
//             adds its arg-max coefficients into dS (its own [L, F] block: no races, the
//             row and column max of one entry add up in one thread); then
//             dt_block += dS @ v_block and dv_block += dS^T @ t_block (two more products),
//             d t_weight += rw summed over the tile's videos, d v_weight likewise.
//
// Memory: one S tile (and one dS tile in the backward) of at most tile_rows x tile_cols
// entries, never [Bt, Bv, L, F]. The per-pair step is the CPU kernel's; the launcher
// (a CUDA kernel, or a host loop for the CPU test hook `_wti_tiled`) only maps pair p of a
// tile to (text i0 + p / nv, video j0 + p % nv).
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
  acc_t *dS, *rw, *cw;             // backward: dS like S (zeroed), rw [nt, nv, L], cw [nt, nv, F]
};

template <typename acc_t>
NBRETR_HD WtiPair<acc_t> wti_tile_pair(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t ii = p / a.nv, jj = p % a.nv, i = a.i0 + ii, j = a.j0 + jj;
  return {a.S + ii * a.L * a.ld + jj * a.F, a.ld, a.mt + i * a.L, a.mv + j * a.F, a.wt + i * a.L,
          a.wv + j * a.F, a.L, a.F};
}

template <typename acc_t>
NBRETR_HD void wti_tile_score(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t i = a.i0 + p / a.nv, j = a.j0 + p % a.nv;
  a.out[i * a.Bv + j] = wti_pair_score(wti_tile_pair(a, p));
}

// Callbacks of wti_pair_backward for pair p of a tile (functors, usable in device code).
template <typename acc_t>
struct WtiStore {
  acc_t* dst;
  NBRETR_HD void operator()(int64_t k, acc_t x) const { dst[k] = x; }
};
template <typename acc_t>
struct WtiAddEntry {
  acc_t* dS;  // the pair's [L, F] block of dS
  int64_t ld;
  NBRETR_HD void operator()(int64_t l, int64_t f, acc_t c) const { dS[l * ld + f] += c; }
};

template <typename acc_t>
NBRETR_HD void wti_tile_backward(const WtiTileArgs<acc_t>& a, int64_t p) {
  const int64_t ii = p / a.nv, jj = p % a.nv, i = a.i0 + ii, j = a.j0 + jj;
  wti_pair_backward(wti_tile_pair(a, p), a.g[i * a.Bv + j], WtiStore<acc_t>{a.rw + p * a.L},
                    WtiStore<acc_t>{a.cw + p * a.F}, WtiAddEntry<acc_t>{a.dS + ii * a.L * a.ld + jj * a.F, a.ld});
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

// Launch: struct with template <typename acc_t> void score(const WtiTileArgs<acc_t>&, int64_t pairs)
// and backward(const WtiTileArgs<acc_t>&, int64_t pairs). half_mm: the GEMM may take fp16/bf16
// inputs with an fp32 output (else t and v are upcast first).
template <typename Launch>
at::Tensor wti_tiled_forward(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                             const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight,
                             const WtiDims& d, int64_t tile_rows, int64_t tile_cols, bool half_mm, Launch& launch) {
  auto out = at::empty({d.Bt, d.Bv}, t.options().dtype(wti_acc_type(t.scalar_type())));
  if (d.Bt == 0 || d.Bv == 0) return out;
  const WtiTiledInputs in = wti_tiled_inputs(t, t_mask, t_weight, v, v_mask, v_weight, d, tile_rows, tile_cols, half_mm);
  auto buf = at::empty({in.tl.TB * d.L * in.tl.VB * d.F}, t.options().dtype(in.acc));
  AT_DISPATCH_FLOATING_TYPES(in.acc, "wti_tiled_forward", [&] {
    wti_for_each_tile(d, in.tl, [&](int64_t i0, int64_t nt, int64_t j0, int64_t nv) {
      at::Tensor S = buf.narrow(0, 0, nt * d.L * nv * d.F).view({nt * d.L, nv * d.F});
      wti_tile_mm(S, in.t2.narrow(0, i0 * d.L, nt * d.L), in.v2.narrow(0, j0 * d.F, nv * d.F));
      WtiTileArgs<scalar_t> a{S.const_data_ptr<scalar_t>(), nv * d.F, i0, nt, j0, nv, d.L, d.F, d.Bv,
                              in.mt.const_data_ptr<scalar_t>(), in.mv.const_data_ptr<scalar_t>(),
                              in.wt.const_data_ptr<scalar_t>(), in.wv.const_data_ptr<scalar_t>(), nullptr,
                              out.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr};
      launch.template score<scalar_t>(a, nt * nv);
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
                              g.const_data_ptr<scalar_t>(), nullptr, dS.mutable_data_ptr<scalar_t>(),
                              rw.mutable_data_ptr<scalar_t>(), cw.mutable_data_ptr<scalar_t>()};
      launch.template backward<scalar_t>(a, nt * nv);
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
