// wti_similarity, CPU. Texts and videos are cut into blocks of about kRows tokens and
// kCols frames; each (text block, video block) task computes its raw dot products as one
// GEMM tile [nt*L, nv*F] (at::mm, fp32 or fp64 accumulation) and reduces every pair in it
// with the max-and-weigh step of csrc/common/wti.h. Memory: one tile per running task,
// never [Bt, Bv, L, F].
//
// Backward: one GEMM recompute per tile (tasks split among threads as in the forward)
// stores every pair's arg-maxes ([Bt, Bv, L] and [Bt, Bv, F], uint8 while L, F <= 256,
// else int32) and the weight gradients (run-local, summed in run order). dL/dt and dL/dv
// are then sparse row sums: each pair adds at most L + F scaled rows (c * v_jf to t's row l,
// c * t_il to v's row f), threads split the texts for dL/dt and the videos for dL/dv (one
// writer per output row, no atomics, deterministic for a given thread count); no dense dS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/wti.h"
#include "common/wti_checks.h"
#include "common/wti_tiled.h"

namespace nbretr {
namespace {

constexpr int64_t kRows = 256;  // text tokens per tile (nt * L)
constexpr int64_t kCols = 256;  // video frames per tile (nv * F)

struct Prepared {
  at::Tensor t, mt, at_, v, mv, av;  // contiguous, accumulation dtype
};

Prepared prepare(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight, const at::Tensor& v,
                 const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const auto acc = wti_acc_type(t.scalar_type());
  return {t.to(acc).contiguous(),        t_mask.to(acc).contiguous(), t_weight.to(acc).contiguous(),
          v.to(acc).contiguous(),        v_mask.to(acc).contiguous(), v_weight.to(acc).contiguous()};
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
    auto tiles = at::empty({runs, TB * d.L * VB * d.F}, p.t.options());
    at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
      at::NoGradGuard no_grad;
      for (int64_t r = rb; r < re; ++r) {
        for (int64_t task = ntasks * r / runs; task < ntasks * (r + 1) / runs; ++task) {
          const int64_t i0 = task / nbv * TB, j0 = task % nbv * VB;
          const int64_t nt = std::min(TB, d.Bt - i0), nv = std::min(VB, d.Bv - j0);
          at::Tensor S = tiles[r].narrow(0, 0, nt * d.L * nv * d.F).view({nt * d.L, nv * d.F});
          at::mm_out(S, t2.narrow(0, i0 * d.L, nt * d.L), v2.narrow(0, j0 * d.F, nv * d.F).t());
          const acc_t* s = S.const_data_ptr<acc_t>();
          const int64_t ld = nv * d.F;
          for (int64_t ii = 0; ii < nt; ++ii) {
            const int64_t i = i0 + ii;
            for (int64_t jj = 0; jj < nv; ++jj) {
              const int64_t j = j0 + jj;
              WtiPair<acc_t> pair{s + ii * d.L * ld + jj * d.F, ld, mt + i * d.L, mv + j * d.F,
                                  wt + i * d.L, wv + j * d.F, d.L, d.F};
              o[i * d.Bv + j] = wti_pair_score(pair);
            }
          }
        }
      }
    });
  });
  return out;
}

// ---- backward helpers ------------------------------------------------------------------

// y += a * x over n elements; float has an AVX2+FMA build picked at run time (no -march).
template <typename T>
void axpy_base(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}
__attribute__((target("avx2,fma"), noinline)) void axpy_avx2(float* __restrict y, float a,
                                                              const float* __restrict x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}
template <typename T>
using AxpyFn = void (*)(T*, T, const T*, int64_t);
template <typename T>
AxpyFn<T> pick_axpy() {
  return &axpy_base<T>;
}
template <>
AxpyFn<float> pick_axpy<float>() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 ? &axpy_avx2 : &axpy_base<float>;
}

// Arg-maxes of one pair (same values and tie rule as wti_row_max / wti_col_max), with
// the weight gradients: gwt[l] += hg * max_f S[l, f], gwv[f] += hg * max_l S[l, f].
template <typename acc_t, typename idx_t>
inline void pair_argmax(const WtiPair<acc_t>& p, acc_t hg, idx_t* ar, idx_t* ac, acc_t* gwt, acc_t* gwv,
                        acc_t* colbest) {
  for (int64_t l = 0; l < p.L; ++l) {
    acc_t best = p.s(l, 0);
    int64_t arg = 0;
    for (int64_t f = 1; f < p.F; ++f) {
      const acc_t x = p.s(l, f);
      if (x > best) {
        best = x;
        arg = f;
      }
    }
    ar[l] = static_cast<idx_t>(arg);
    gwt[l] += hg * best;
  }
  for (int64_t f = 0; f < p.F; ++f) {
    colbest[f] = p.s(0, f);
    ac[f] = 0;
  }
  for (int64_t l = 1; l < p.L; ++l) {
    for (int64_t f = 0; f < p.F; ++f) {
      const acc_t x = p.s(l, f);
      if (x > colbest[f]) {
        colbest[f] = x;
        ac[f] = static_cast<idx_t>(l);
      }
    }
  }
  for (int64_t f = 0; f < p.F; ++f) gwv[f] += hg * colbest[f];
}

template <typename acc_t, typename idx_t>
void backward_impl(const WtiDims& d, const Prepared& p, const acc_t* gp, at::Tensor& gt, at::Tensor& gwt,
                   at::Tensor& gv, at::Tensor& gwv) {
  const int64_t L = d.L, F = d.F, D = d.D, Bt = d.Bt, Bv = d.Bv;
  const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
  const acc_t *wt = p.at_.const_data_ptr<acc_t>(), *wv = p.av.const_data_ptr<acc_t>();
  const acc_t *tp = p.t.const_data_ptr<acc_t>(), *vp = p.v.const_data_ptr<acc_t>();
  const auto t2 = p.t.view({Bt * L, D}), v2 = p.v.view({Bv * F, D});
  const auto idx_dtype = sizeof(idx_t) == 1 ? at::kByte : at::kInt;
  // 1) one GEMM recompute: the arg-maxes of every pair ([Bt, Bv, L] and [Bt, Bv, F]) and
  //    the weight gradients (run-local, summed in run order: deterministic per thread count)
  auto AR = at::empty({Bt, Bv, L}, p.t.options().dtype(idx_dtype));
  auto AC = at::empty({Bt, Bv, F}, p.t.options().dtype(idx_dtype));
  idx_t* arp = static_cast<idx_t*>(AR.data_ptr());
  idx_t* acp = static_cast<idx_t*>(AC.data_ptr());
  const int64_t TB = std::max<int64_t>(1, kRows / L), VB = std::max<int64_t>(1, kCols / F);
  const int64_t nbt = (Bt + TB - 1) / TB, nbv = (Bv + VB - 1) / VB, ntasks = nbt * nbv;
  const int64_t nthreads = at::get_num_threads();
  // fused: enough text blocks to split them among threads, so each thread owns its texts'
  // dL/dt rows and adds them while the tile's videos are still in cache
  const bool fused = nbt >= 2 * nthreads;
  const int64_t runs = fused ? nthreads : std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks));
  auto tiles = at::empty({runs, TB * L * VB * F}, p.t.options());
  auto lwt = at::zeros({fused ? 1 : runs, Bt * L}, p.t.options());
  auto lwv = at::zeros({runs, Bv * F}, p.t.options());
  auto colbuf = at::empty({runs, F}, p.t.options());
  const AxpyFn<acc_t> axpy = pick_axpy<acc_t>();
  acc_t* gtp = gt.mutable_data_ptr<acc_t>();
  acc_t* gvp = gv.mutable_data_ptr<acc_t>();
  // Every nonzero (text token l, frame f, coefficient c) of pair (i, j)'s gradient,
  // from its arg-maxes, coefficients exactly as wti_pair_backward: dL/dt_il += c v_jf and
  // dL/dv_jf += c t_il. One walk serves the dL/dt and the dL/dv passes.
  auto for_each_coef = [&](int64_t i, int64_t j, acc_t hg, auto&& visit) {
    const idx_t* ar = arp + (i * Bv + j) * L;
    const idx_t* ac = acp + (i * Bv + j) * F;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t a = ar[l];
      const acc_t c = hg * wt[i * L + l] * mt[i * L + l] * mv[j * F + a];
      if (c != acc_t(0)) visit(l, a, c);
    }
    for (int64_t f = 0; f < F; ++f) {
      const int64_t a = ac[f];
      const acc_t c = hg * wv[j * F + f] * mt[i * L + a] * mv[j * F + f];
      if (c != acc_t(0)) visit(a, f, c);
    }
  };
  auto add_dt = [&](int64_t i, int64_t j, acc_t hg) {
    for_each_coef(i, j, hg, [&](int64_t l, int64_t f, acc_t c) {
      axpy(gtp + (i * L + l) * D, c, vp + (j * F + f) * D, D);
    });
  };
  auto do_task = [&](int64_t task, int64_t r, acc_t* gwt_r) {
    acc_t* gwv_r = lwv.mutable_data_ptr<acc_t>() + r * Bv * F;
    acc_t* cb = colbuf.mutable_data_ptr<acc_t>() + r * F;
    const int64_t i0 = task / nbv * TB, j0 = task % nbv * VB;
    const int64_t nt = std::min(TB, Bt - i0), nv = std::min(VB, Bv - j0);
    at::Tensor S = tiles[r].narrow(0, 0, nt * L * nv * F).view({nt * L, nv * F});
    at::mm_out(S, t2.narrow(0, i0 * L, nt * L), v2.narrow(0, j0 * F, nv * F).t());
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
                                  gwt_r + i * L, gwv_r + j * F, cb);
        if (fused) add_dt(i, j, acc_t(0.5) * g);
      }
    }
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

  // 2) dL/dt and dL/dv from the arg-maxes: each pair adds at most L + F scaled rows
  //    (c * v_jf to t's row l, c * t_il to v's row f), no dense dS. Texts are split
  //    among threads for dT (unless fused above) and videos for dV (one writer per row).
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(acc_t));
  const int64_t TB2 = std::max<int64_t>(1, (256 << 10) / (L * row_bytes));
  const int64_t VB2 = std::max<int64_t>(1, (256 << 10) / (F * row_bytes));
  if (!fused) {
    at::parallel_for(0, (Bt + TB2 - 1) / TB2, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i0 = b0 * TB2; i0 < std::min(Bt, b1 * TB2); i0 += TB2) {
        const int64_t i1 = std::min(Bt, i0 + TB2);
        for (int64_t j0 = 0; j0 < Bv; j0 += VB2) {
          const int64_t j1 = std::min(Bv, j0 + VB2);
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = j0; j < j1; ++j) {
              const acc_t g = gp[i * Bv + j];
              if (g != acc_t(0)) add_dt(i, j, acc_t(0.5) * g);
            }
        }
      }
    });
  }
  at::parallel_for(0, (Bv + VB2 - 1) / VB2, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j0 = b0 * VB2; j0 < std::min(Bv, b1 * VB2); j0 += VB2) {
      const int64_t j1 = std::min(Bv, j0 + VB2);
      for (int64_t i0 = 0; i0 < Bt; i0 += TB2) {
        const int64_t i1 = std::min(Bt, i0 + TB2);
        for (int64_t j = j0; j < j1; ++j) {
          for (int64_t i = i0; i < i1; ++i) {
            const acc_t g = gp[i * Bv + j];
            if (g == acc_t(0)) continue;
            for_each_coef(i, j, acc_t(0.5) * g, [&](int64_t l, int64_t f, acc_t c) {
              axpy(gvp + (j * F + f) * D, c, tp + (i * L + l) * D, D);
            });
          }
        }
      }
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
  auto gv = at::zeros({d.Bv, d.F, d.D}, t.options().dtype(acc));
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
  return {gt.to(t.scalar_type()), gwt.to(t_weight.scalar_type()), gv.to(v.scalar_type()),
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
