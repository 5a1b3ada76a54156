// sinkhorn_log / sinkhorn_log_backward, CPU.
//
// Two schedules, both built from the same range kernels (so a problem's result does not
// depend on which one ran it):
//  * per problem (B >= threads, or small problems): one at::parallel_for over problems;
//    each thread runs its problems' whole iteration loop serially (no barrier per
//    half-step: a 128 x 128 problem is ~16k exps per half-step, far less than a barrier
//    costs on a busy machine);
//  * chunked (few large problems): per half-step one at::parallel_for over (problem,
//    chunk of rows or columns), so one 4,096 x 4,096 problem uses every core.
// Rows: two-pass log-sum-exp (max, then sum of exp) over a contiguous row, both passes
// `omp simd` reductions. Columns: the same two passes streamed row by row into per-column
// max/sum arrays, so every inner loop is contiguous and element-wise. The float kernels
// are compiled three times (AVX-512, AVX2+FMA, baseline x86-64; picked at run time), so
// the exp polynomial of csrc/common/sinkhorn.h runs 16, 8 or 4 lanes wide without
// -march=native.
// The math (exp, LSE, the tol error, the backward weights) is csrc/common/sinkhorn.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cpu_isa.h"
#include "common/sinkhorn.h"
#include "common/sinkhorn_checks.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SK_X86_DISPATCH 1
#define SK_AVX2 __attribute__((target("avx2,fma"), noinline))
#define SK_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512"), noinline))
#endif
#define SK_INLINE inline __attribute__((always_inline))

namespace nbretr {
namespace {

using namespace nbretr::sinkhorn;

// ---- range kernels (templates, inlined into the per-dtype entry points below) ---------

// R_i = LSE_j(K_ij + w_j) for rows [i0, i1) (every row has a finite entry).
template <typename T>
SK_INLINE void rows_lse_impl(const T* __restrict__ K, int64_t N, const T* __restrict__ w, int64_t i0, int64_t i1,
                             T* __restrict__ R) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* __restrict__ k = K + i * N;
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < N; ++j) {
      const T x = k[j] + w[j];
      m = x > m ? x : m;
    }
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < N; ++j) s += sk_exp(k[j] + w[j] - m);
    R[i] = lse_from(m, s);
  }
}

// v_j = b_j - LSE_i(K_ij + u_i) for columns [j0, j1); m, s: scratch of length j1 - j0.
template <typename T>
SK_INLINE void cols_pot_impl(const T* __restrict__ K, int64_t M, int64_t N, const T* __restrict__ u,
                             const T* __restrict__ bn, int64_t j0, int64_t j1, T* __restrict__ m, T* __restrict__ s,
                             T* __restrict__ v) {
  const int64_t w = j1 - j0;
  for (int64_t j = 0; j < w; ++j) m[j] = neg_inf<T>();
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ k = K + i * N + j0;
    const T ui = u[i];
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T x = k[j] + ui;
      m[j] = x > m[j] ? x : m[j];
    }
  }
  for (int64_t j = 0; j < w; ++j) s[j] = T(0);
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ k = K + i * N + j0;
    const T ui = u[i];
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) s[j] += sk_exp(k[j] + ui - m[j]);
  }
  for (int64_t j = 0; j < w; ++j) v[j0 + j] = potential(bn[j0 + j], lse_from(m[j], s[j]));
}

// Backward of iteration t for rows [i0, i1) of one problem: wv = v_t - b, vp = v_{t-1},
// ut = u_t; updates gk, reads/zeroes gu, adds to ga, accumulates sum_i gu_i Q^u_ij in P.
template <typename T>
SK_INLINE void bwd_rows_impl(const T* __restrict__ K, int64_t N, const T* __restrict__ ut, const T* __restrict__ a,
                             const T* __restrict__ wv, const T* __restrict__ vp, const T* __restrict__ gv,
                             int64_t i0, int64_t i1, T* __restrict__ gK, T* __restrict__ gu, T* __restrict__ ga,
                             T* __restrict__ P) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* __restrict__ k = K + i * N;
    T* __restrict__ gk = gK + i * N;
    const T ui = ut[i];
    // v_t half-step: column-softmax weights Q^v_ij
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; ++j) {
      const T q = gv[j] * half_step_weight(k[j], ui, wv[j]);
      gk[j] -= q;
      acc += q;
    }
    const T gui = gu[i] - acc;
    ga[i] += gui;
    gu[i] = T(0);
    // u_t half-step: row-softmax weights Q^u_ij
    const T ci = ui - a[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const T q = gui * half_step_weight(k[j], ci, vp[j]);
      gk[j] -= q;
      P[j] += q;
    }
  }
}

// ---- per-dtype entry points ------------------------------------------------------------
// float: AVX-512 and AVX2+FMA builds of each kernel, the widest the CPU has chosen at run
// time, else the baseline x86-64 (SSE2) build; all vectorise the exp polynomial. double (exp from
// libm, used for gradcheck) has one build.

#define SK_FLOAT_KERNELS(suffix, attr)                                                                             \
  attr void rows_lse_##suffix(const float* K, int64_t N, const float* w, int64_t i0, int64_t i1, float* R) {       \
    rows_lse_impl(K, N, w, i0, i1, R);                                                                           \
  }                                                                                                              \
  attr void cols_pot_##suffix(const float* K, int64_t M, int64_t N, const float* u, const float* bn, int64_t j0,  \
                              int64_t j1, float* m, float* s, float* v) {                                        \
    cols_pot_impl(K, M, N, u, bn, j0, j1, m, s, v);                                                              \
  }                                                                                                              \
  attr void bwd_rows_##suffix(const float* K, int64_t N, const float* ut, const float* a, const float* wv,        \
                              const float* vp, const float* gv, int64_t i0, int64_t i1, float* gK, float* gu,    \
                              float* ga, float* P) {                                                             \
    bwd_rows_impl(K, N, ut, a, wv, vp, gv, i0, i1, gK, gu, ga, P);                                               \
  }

SK_FLOAT_KERNELS(base, __attribute__((noinline)))
#ifdef SK_X86_DISPATCH
SK_FLOAT_KERNELS(avx2, SK_AVX2)
SK_FLOAT_KERNELS(avx512, SK_AVX512)
// the widest build the CPU runs (csrc/common/cpu_isa.h; the cpu_isa kernel setting caps it)
#define SK_PICK(fn, ...) \
  (cpu_isa_level() == 2 ? fn##_avx512(__VA_ARGS__) : cpu_isa_level() == 1 ? fn##_avx2(__VA_ARGS__) : fn##_base(__VA_ARGS__))
#else
#define SK_PICK(fn, ...) fn##_base(__VA_ARGS__)
#endif

void rows_lse(const float* K, int64_t N, const float* w, int64_t i0, int64_t i1, float* R) {
  SK_PICK(rows_lse, K, N, w, i0, i1, R);
}
void cols_pot(const float* K, int64_t M, int64_t N, const float* u, const float* bn, int64_t j0, int64_t j1,
              float* m, float* s, float* v) {
  SK_PICK(cols_pot, K, M, N, u, bn, j0, j1, m, s, v);
}
void bwd_rows(const float* K, int64_t N, const float* ut, const float* a, const float* wv, const float* vp,
              const float* gv, int64_t i0, int64_t i1, float* gK, float* gu, float* ga, float* P) {
  SK_PICK(bwd_rows, K, N, ut, a, wv, vp, gv, i0, i1, gK, gu, ga, P);
}
void rows_lse(const double* K, int64_t N, const double* w, int64_t i0, int64_t i1, double* R) {
  rows_lse_impl(K, N, w, i0, i1, R);
}
void cols_pot(const double* K, int64_t M, int64_t N, const double* u, const double* bn, int64_t j0, int64_t j1,
              double* m, double* s, double* v) {
  cols_pot_impl(K, M, N, u, bn, j0, j1, m, s, v);
}
void bwd_rows(const double* K, int64_t N, const double* ut, const double* a, const double* wv, const double* vp,
              const double* gv, int64_t i0, int64_t i1, double* gK, double* gu, double* ga, double* P) {
  bwd_rows_impl(K, N, ut, a, wv, vp, gv, i0, i1, gK, gu, ga, P);
}

// ---- schedules -----------------------------------------------------------------------

// Run each problem's whole loop on one thread when there are enough problems to fill the
// threads, or when a problem is too small to be worth one barrier per half-step.
bool per_problem_schedule(int64_t B, int64_t M, int64_t N) {
  return B >= at::get_num_threads() || M * N <= 256 * 256;
}

// Split `len` into chunks so that B * chunks work items keep every thread busy.
struct Chunks {
  int64_t count, size;
};
Chunks make_chunks(int64_t B, int64_t len) {
  const int64_t want = std::max<int64_t>(1, (2 * at::get_num_threads() + B - 1) / B);
  const int64_t count0 = std::min<int64_t>(want, len);
  const int64_t size = (len + count0 - 1) / count0;
  return {(len + size - 1) / size, size};
}

// Whether a problem stops before iteration t (t >= 1): its row-marginal error after
// iteration t, from the next row LSE R, is < tol.
template <typename T>
bool converged(const T* u, const T* R, const T* a, int64_t M, T tol) {
  T err = T(0);
  for (int64_t i = 0; i < M; ++i) err = sk_max(err, row_marginal_error(u[i], R[i], a[i]));
  return err < tol;
}

template <typename T>
void forward_impl(const at::Tensor& K, const at::Tensor& log_mu, const at::Tensor& log_nu, int64_t n_iters,
                  std::optional<double> tol, at::Tensor& u_out, at::Tensor& v_out, at::Tensor& iters_out,
                  at::Tensor& u_hist, at::Tensor& v_hist) {
  const int64_t B = K.size(0), M = K.size(1), N = K.size(2);
  const T* Kp = K.const_data_ptr<T>();
  const T* a = log_mu.const_data_ptr<T>();
  const T* bn = log_nu.const_data_ptr<T>();
  T* u = u_out.mutable_data_ptr<T>();
  T* v = v_out.mutable_data_ptr<T>();
  T* uh = u_hist.mutable_data_ptr<T>();
  T* vh = v_hist.mutable_data_ptr<T>();
  int64_t* iters = iters_out.mutable_data_ptr<int64_t>();
  const bool use_tol = tol.has_value();
  const T tol_v = use_tol ? static_cast<T>(*tol) : T(0);

  if (per_problem_schedule(B, M, N)) {
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> R(M), cm(N), cs(N);
      for (int64_t b = lo; b < hi; ++b) {
        const T* Kb = Kp + b * M * N;
        const T *ab = a + b * M, *bb = bn + b * N;
        T *ub = u + b * M, *vb = v + b * N;
        for (int64_t t = 0; t < n_iters; ++t) {
          rows_lse(Kb, N, vb, 0, M, R.data());
          if (use_tol && t >= 1 && converged(ub, R.data(), ab, M, tol_v)) break;
          T* uht = uh + (b * n_iters + t) * M;
          for (int64_t i = 0; i < M; ++i) uht[i] = ub[i] = potential(ab[i], R[i]);
          cols_pot(Kb, M, N, ub, bb, 0, N, cm.data(), cs.data(), vb);
          std::copy(vb, vb + N, vh + (b * n_iters + t) * N);
          iters[b] = t + 1;
        }
      }
    });
    return;
  }

  std::vector<T> R(B * M), cm(B * N), cs(B * N);
  std::vector<char> active(B, 1);
  const Chunks rc = make_chunks(B, M), cc = make_chunks(B, N);
  for (int64_t t = 0; t < n_iters; ++t) {
    // u half-step, part 1: R_i = LSE_j(K_ij + v_j)
    at::parallel_for(0, B * rc.count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const int64_t b = w / rc.count, c = w % rc.count;
        if (!active[b]) continue;
        const int64_t i0 = c * rc.size, i1 = std::min(M, i0 + rc.size);
        rows_lse(Kp + b * M * N, N, v + b * N, i0, i1, R.data() + b * M);
      }
    });
    // tol: the row-marginal error of iteration t (u_t, v_t); then commit u_{t+1}
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (!active[b]) continue;
      if (use_tol && t >= 1 && converged(u + b * M, R.data() + b * M, a + b * M, M, tol_v)) {
        active[b] = 0;
        continue;
      }
      for (int64_t i = 0; i < M; ++i) {
        const T ui = potential(a[b * M + i], R[b * M + i]);
        u[b * M + i] = ui;
        uh[(b * n_iters + t) * M + i] = ui;
      }
      any = true;
    }
    if (!any) break;
    // v half-step
    at::parallel_for(0, B * cc.count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const int64_t b = w / cc.count, c = w % cc.count;
        if (!active[b]) continue;
        const int64_t j0 = c * cc.size, j1 = std::min(N, j0 + cc.size);
        const int64_t o = b * N + j0;
        cols_pot(Kp + b * M * N, M, N, u + b * M, bn + b * N, j0, j1, cm.data() + o, cs.data() + o, v + b * N);
        std::copy(v + o, v + b * N + j1, vh + (b * n_iters + t) * N + j0);
      }
    });
    for (int64_t b = 0; b < B; ++b) iters[b] += active[b] ? 1 : 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_cpu(
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu, int64_t n_iters, double eps,
    std::optional<double> tol) {
  check_sinkhorn_args(scores, log_mu, log_nu, n_iters, eps, tol, c10::DeviceType::CPU);
  const auto acc = sinkhorn_acc_type(scores);
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  // K = scores / eps, computed exactly as the torch path does; becomes log_plan in place.
  at::Tensor K = at::div(scores.to(acc), eps).contiguous();
  const auto opts = K.options();
  at::Tensor u = at::zeros({B, M}, opts), v = at::zeros({B, N}, opts);
  at::Tensor iters = at::zeros({B}, opts.dtype(at::kLong));
  at::Tensor uh = at::zeros({B, n_iters, M}, opts), vh = at::zeros({B, n_iters, N}, opts);
  if (K.numel() == 0) return {K, u, v, iters, uh, vh};
  check_sinkhorn_masks(scores);
  const at::Tensor a = log_mu.to(acc).contiguous(), b = log_nu.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "sinkhorn_log_cpu", [&] {
    forward_impl<scalar_t>(K, a, b, n_iters, tol, u, v, iters, uh, vh);
  });
  K.add_(u.unsqueeze(2)).add_(v.unsqueeze(1));
  return {K, u, v, iters, uh, vh};
}

template <typename T>
void backward_impl(const at::Tensor& K, const at::Tensor& log_mu, const at::Tensor& log_nu, const at::Tensor& u_hist,
                   const at::Tensor& v_hist, const at::Tensor& iters_done, at::Tensor& gK, at::Tensor& gu_t,
                   at::Tensor& gv_t, at::Tensor& ga_t, at::Tensor& gb_t) {
  const int64_t B = K.size(0), M = K.size(1), N = K.size(2), T_ = u_hist.size(1);
  const T* Kp = K.const_data_ptr<T>();
  const T* a = log_mu.const_data_ptr<T>();
  const T* bn = log_nu.const_data_ptr<T>();
  const T* uh = u_hist.const_data_ptr<T>();
  const T* vh = v_hist.const_data_ptr<T>();
  const int64_t* iters = iters_done.const_data_ptr<int64_t>();
  T* g = gK.mutable_data_ptr<T>();
  T* gu = gu_t.mutable_data_ptr<T>();
  T* gv = gv_t.mutable_data_ptr<T>();
  T* ga = ga_t.mutable_data_ptr<T>();
  T* gb = gb_t.mutable_data_ptr<T>();

  // W = v_t - b (v half-step weights), Vp = v_{t-1} (u half-step weights) of problem b
  auto weights = [&](int64_t b, int64_t t, T* W, T* Vp) {
    const T* vt = vh + (b * T_ + t - 1) * N;
    for (int64_t j = 0; j < N; ++j) {
      W[j] = vt[j] - bn[b * N + j];
      Vp[j] = t >= 2 ? vh[(b * T_ + t - 2) * N + j] : T(0);
    }
  };

  if (per_problem_schedule(B, M, N)) {
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> P(N), W(N), Vp(N);
      for (int64_t b = lo; b < hi; ++b) {
        T *gvb = gv + b * N, *gbb = gb + b * N;
        for (int64_t t = iters[b]; t >= 1; --t) {
          weights(b, t, W.data(), Vp.data());
          std::fill(P.begin(), P.end(), T(0));
          bwd_rows(Kp + b * M * N, N, uh + (b * T_ + t - 1) * M, a + b * M, W.data(), Vp.data(), gvb, 0, M,
                   g + b * M * N, gu + b * M, ga + b * M, P.data());
          // gb collects gbar(v_t); gbar(v_{t-1}) = -sum_i gu_i Q^u_ij
          for (int64_t j = 0; j < N; ++j) {
            gbb[j] += gvb[j];
            gvb[j] = -P[j];
          }
        }
      }
    });
    return;
  }

  int64_t t_max = 0;
  for (int64_t b = 0; b < B; ++b) t_max = std::max(t_max, iters[b]);
  const Chunks rc = make_chunks(B, M);
  std::vector<T> P(B * rc.count * N), W(B * N), Vp(B * N);
  for (int64_t t = t_max; t >= 1; --t) {
    for (int64_t b = 0; b < B; ++b)
      if (iters[b] >= t) weights(b, t, W.data() + b * N, Vp.data() + b * N);
    at::parallel_for(0, B * rc.count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const int64_t b = w / rc.count, c = w % rc.count;
        if (iters[b] < t) continue;
        T* Pc = P.data() + w * N;
        std::fill(Pc, Pc + N, T(0));
        const int64_t i0 = c * rc.size, i1 = std::min(M, i0 + rc.size);
        bwd_rows(Kp + b * M * N, N, uh + (b * T_ + t - 1) * M, a + b * M, W.data() + b * N, Vp.data() + b * N,
                 gv + b * N, i0, i1, g + b * M * N, gu + b * M, ga + b * M, Pc);
      }
    });
    // gb collects gbar(v_t); gbar(v_{t-1}) = -sum_i gu_i Q^u_ij (sum over the row chunks)
    for (int64_t b = 0; b < B; ++b) {
      if (iters[b] < t) continue;
      for (int64_t j = 0; j < N; ++j) {
        gb[b * N + j] += gv[b * N + j];
        T s = T(0);
        for (int64_t c = 0; c < rc.count; ++c) s += P[(b * rc.count + c) * N + j];
        gv[b * N + j] = -s;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_backward_cpu(
    const at::Tensor& grad_log_plan, const at::Tensor& grad_log_u, const at::Tensor& grad_log_v,
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu, const at::Tensor& u_hist,
    const at::Tensor& v_hist, const at::Tensor& iters_done, double eps) {
  check_sinkhorn_backward_args(grad_log_plan, grad_log_u, grad_log_v, scores, log_mu, log_nu, u_hist, v_hist,
                               iters_done, eps, c10::DeviceType::CPU);
  const auto acc = sinkhorn_acc_type(scores);
  at::Tensor gK = grad_log_plan.contiguous().clone();
  // gbar(u_T), gbar(v_T): the direct gradients plus log_plan's broadcast of u and v
  at::Tensor gu = (grad_log_u + grad_log_plan.sum(2)).contiguous();
  at::Tensor gv = (grad_log_v + grad_log_plan.sum(1)).contiguous();
  at::Tensor ga = at::zeros_like(gu), gb = at::zeros_like(gv);
  if (gK.numel() > 0) {
    const at::Tensor K = at::div(scores.to(acc), eps).contiguous();
    const at::Tensor a = log_mu.to(acc).contiguous(), b = log_nu.to(acc).contiguous();
    const at::Tensor uh = u_hist.contiguous(), vh = v_hist.contiguous(), it = iters_done.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "sinkhorn_log_backward_cpu", [&] {
      backward_impl<scalar_t>(K, a, b, uh, vh, it, gK, gu, gv, ga, gb);
    });
  }
  gK.div_(eps);
  return {gK.to(scores.scalar_type()), ga.to(log_mu.scalar_type()), gb.to(log_nu.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CPU, m) {
  m.impl("sinkhorn_log", &sinkhorn_log_cpu);
  m.impl("sinkhorn_log_backward", &sinkhorn_log_backward_cpu);
}

}  // namespace nbretr
