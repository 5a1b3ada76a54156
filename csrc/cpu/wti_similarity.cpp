// wti_similarity, CPU. Texts and videos are cut into blocks of about kRows tokens and
// kCols frames; each (text block, video block) task computes its raw dot products as one
// GEMM tile [nt*L, nv*F] (at::mm, fp32 or fp64 accumulation) and reduces every pair in it
// with the max-and-weigh step of csrc/common/wti.h. Memory: one tile per running task,
// never [Bt, Bv, L, F].
//
// Backward: text blocks in sequence; within one, the video blocks are split into one
// contiguous run per thread. Each run recomputes its tiles and arg-maxes, scatters the
// pairs' dL/dS (at most L + F entries per pair) into a zeroed tile dS and applies it with
// two GEMMs (dT += dS V, dV += dS^T T): the gradients of its own videos go directly into
// the output, those of the shared text block into a run-local buffer, summed in run
// order afterwards (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/wti.h"
#include "common/wti_checks.h"

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
  if (d.Bt > 0 && d.Bv > 0) {
    const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
    const at::Tensor g = grad.to(acc).contiguous();
    const int64_t TB = std::max<int64_t>(1, kRows / d.L), VB = std::max<int64_t>(1, kCols / d.F);
    const int64_t nbv = (d.Bv + VB - 1) / VB;
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nbv));
    const auto t2 = p.t.view({d.Bt * d.L, d.D}), v2 = p.v.view({d.Bv * d.F, d.D});
    // run-local gradients of the current text block: [runs, TB*L, D] and [runs, TB*L]
    auto local_t = at::empty({runs, TB * d.L, d.D}, gt.options());
    auto local_wt = at::empty({runs, TB * d.L}, gt.options());
    auto tiles = at::empty({runs, TB * d.L * VB * d.F}, gt.options());
    auto dtiles = at::empty({runs, TB * d.L * VB * d.F}, gt.options());

    AT_DISPATCH_FLOATING_TYPES(acc, "wti_similarity_backward_cpu", [&] {
      using acc_t = scalar_t;
      const acc_t *mt = p.mt.const_data_ptr<acc_t>(), *mv = p.mv.const_data_ptr<acc_t>();
      const acc_t *wt = p.at_.const_data_ptr<acc_t>(), *wv = p.av.const_data_ptr<acc_t>();
      const acc_t* gp = g.const_data_ptr<acc_t>();
      acc_t* gwvp = gwv.mutable_data_ptr<acc_t>();
      const at::Tensor gv2 = gv.view({d.Bv * d.F, d.D});
      const int64_t D = d.D, L = d.L, F = d.F;
      for (int64_t i0 = 0; i0 < d.Bt; i0 += TB) {
        const int64_t nt = std::min(TB, d.Bt - i0);
        local_t.zero_();
        local_wt.zero_();
        const at::Tensor tb = t2.narrow(0, i0 * L, nt * L);
        at::parallel_for(0, runs, 1, [&](int64_t rb, int64_t re) {
          at::NoGradGuard no_grad;  // worker threads: plain tensor math below autograd
          for (int64_t r = rb; r < re; ++r) {
            at::Tensor lt = local_t[r].narrow(0, 0, nt * L);
            acc_t* lwt = local_wt.mutable_data_ptr<acc_t>() + r * TB * L;
            const int64_t vb_begin = nbv * r / runs, vb_end = nbv * (r + 1) / runs;
            for (int64_t vb = vb_begin; vb < vb_end; ++vb) {
              const int64_t j0 = vb * VB, nv = std::min(VB, d.Bv - j0);
              const at::Tensor vblk = v2.narrow(0, j0 * F, nv * F);
              at::Tensor S = tiles[r].narrow(0, 0, nt * L * nv * F).view({nt * L, nv * F});
              at::mm_out(S, tb, vblk.t());
              // dL/draw for the tile: at most L + F entries per pair, then two GEMMs
              at::Tensor dS = dtiles[r].narrow(0, 0, nt * L * nv * F).view({nt * L, nv * F});
              dS.zero_();
              const acc_t* s = S.const_data_ptr<acc_t>();
              acc_t* ds = dS.mutable_data_ptr<acc_t>();
              const int64_t ld = nv * F;
              for (int64_t ii = 0; ii < nt; ++ii) {
                const int64_t i = i0 + ii;
                for (int64_t jj = 0; jj < nv; ++jj) {
                  const int64_t j = j0 + jj;
                  const acc_t gij = gp[i * d.Bv + j];
                  if (gij == acc_t(0)) continue;
                  WtiPair<acc_t> pair{s + ii * L * ld + jj * F, ld, mt + i * L, mv + j * F,
                                      wt + i * L, wv + j * F, L, F};
                  acc_t* dsp = ds + ii * L * ld + jj * F;
                  wti_pair_backward(
                      pair, gij, [&](int64_t l, acc_t x) { lwt[ii * L + l] += x; },
                      [&](int64_t f, acc_t x) { gwvp[j * F + f] += x; },
                      [&](int64_t l, int64_t f, acc_t c) { dsp[l * ld + f] += c; });
                }
              }
              lt.addmm_(dS, vblk);
              gv2.narrow(0, j0 * F, nv * F).addmm_(dS.t(), tb);
            }
          }
        });
        gt.narrow(0, i0, nt).view({nt * L, D}).add_(local_t.narrow(1, 0, nt * L).sum(0));
        gwt.narrow(0, i0, nt).view({nt * L}).add_(local_wt.narrow(1, 0, nt * L).sum(0));
      }
    });
  }
  return {gt.to(t.scalar_type()), gwt.to(t_weight.scalar_type()), gv.to(v.scalar_type()),
          gwv.to(v_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) {
  m.impl("wti_similarity", &wti_similarity_cpu);
  m.impl("wti_similarity_backward", &wti_similarity_backward_cpu);
}

}  // namespace nbretr
