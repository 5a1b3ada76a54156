// sinkhorn_log / sinkhorn_log_backward, CPU.
//
// Every half-step is one at::parallel_for over (problem, chunk of rows or columns), so a
// batch of small problems and a single 4,096 x 4,096 problem both use every core. Rows:
// two-pass log-sum-exp (max, then sum of exp) over a row, with L independent lanes so the
// compiler vectorises it; columns: the same two passes streamed row by row over a chunk of
// columns (element-wise along the row, so it vectorises without a horizontal reduction).
// The math (exp, LSE, the tol error, the backward weights) is csrc/common/sinkhorn.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/sinkhorn.h"
#include "common/sinkhorn_checks.h"

namespace nbretr {
namespace {

using namespace nbretr::sinkhorn;

template <typename T>
constexpr int kLanes = 64 / sizeof(T);

// LSE_j(k_j + w_j), j < n (n >= 1, at least one finite k_j).
template <typename T>
T row_lse(const T* __restrict__ k, const T* __restrict__ w, int64_t n) {
  constexpr int L = kLanes<T>;
  T mx[L];
  for (int l = 0; l < L; ++l) mx[l] = neg_inf<T>();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) {
      const T x = k[j + l] + w[j + l];
      mx[l] = x > mx[l] ? x : mx[l];
    }
  }
  T m = neg_inf<T>();
  for (int l = 0; l < L; ++l) m = sk_max(m, mx[l]);
  for (int64_t jj = j; jj < n; ++jj) m = sk_max(m, k[jj] + w[jj]);
  T s[L];
  for (int l = 0; l < L; ++l) s[l] = T(0);
  for (j = 0; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) s[l] += sk_exp(k[j + l] + w[j + l] - m);
  }
  T sum = T(0);
  for (int l = 0; l < L; ++l) sum += s[l];
  for (int64_t jj = j; jj < n; ++jj) sum += sk_exp(k[jj] + w[jj] - m);
  return lse_from(m, sum);
}

// out_j = LSE_i(K_ij + u_i) for j in [j0, j1); m, s: scratch of length j1 - j0.
template <typename T>
void col_lse(const T* __restrict__ K, int64_t M, int64_t N, const T* __restrict__ u, int64_t j0, int64_t j1,
             T* __restrict__ m, T* __restrict__ s, T* __restrict__ out) {
  const int64_t w = j1 - j0;
  for (int64_t j = 0; j < w; ++j) m[j] = neg_inf<T>();
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ k = K + i * N + j0;
    const T ui = u[i];
    for (int64_t j = 0; j < w; ++j) {
      const T x = k[j] + ui;
      m[j] = x > m[j] ? x : m[j];
    }
  }
  for (int64_t j = 0; j < w; ++j) s[j] = T(0);
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ k = K + i * N + j0;
    const T ui = u[i];
    for (int64_t j = 0; j < w; ++j) s[j] += sk_exp(k[j] + ui - m[j]);
  }
  for (int64_t j = 0; j < w; ++j) out[j] = lse_from(m[j], s[j]);
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
  std::vector<T> R(B * M), cm(B * N), cs(B * N), cl(B * N);
  std::vector<char> active(B, 1);
  const Chunks rc = make_chunks(B, M), cc = make_chunks(B, N);
  const bool use_tol = tol.has_value();
  const T tol_v = use_tol ? static_cast<T>(*tol) : T(0);

  for (int64_t t = 0; t < n_iters; ++t) {
    // u half-step, part 1: R_i = LSE_j(K_ij + v_j)
    at::parallel_for(0, B * rc.count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const int64_t b = w / rc.count, c = w % rc.count;
        if (!active[b]) continue;
        const int64_t i1 = std::min(M, (c + 1) * rc.size);
        for (int64_t i = c * rc.size; i < i1; ++i) R[b * M + i] = row_lse(Kp + (b * M + i) * N, v + b * N, N);
      }
    });
    // tol: the row-marginal error of iteration t (u_t, v_t); then commit u_{t+1}
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (!active[b]) continue;
      if (use_tol && t >= 1) {
        T err = T(0);
        for (int64_t i = 0; i < M; ++i) err = sk_max(err, row_marginal_error(u[b * M + i], R[b * M + i], a[b * M + i]));
        if (err < tol_v) {
          active[b] = 0;
          continue;
        }
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
        col_lse(Kp + b * M * N, M, N, u + b * M, j0, j1, cm.data() + o, cs.data() + o, cl.data() + o);
        for (int64_t j = j0; j < j1; ++j) {
          const T vj = potential(bn[b * N + j], cl[b * N + j]);
          v[b * N + j] = vj;
          vh[(b * n_iters + t) * N + j] = vj;
        }
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
  int64_t t_max = 0;
  for (int64_t b = 0; b < B; ++b) t_max = std::max(t_max, iters[b]);
  const Chunks rc = make_chunks(B, M);
  std::vector<T> P(B * rc.count * N), W(B * N), Vp(B * N);

  for (int64_t t = t_max; t >= 1; --t) {
    // per problem: W = v_t - b (v half-step weights), Vp = v_{t-1} (u half-step weights)
    for (int64_t b = 0; b < B; ++b) {
      if (iters[b] < t) continue;
      const T* vt = vh + (b * T_ + t - 1) * N;
      for (int64_t j = 0; j < N; ++j) {
        W[b * N + j] = vt[j] - bn[b * N + j];
        Vp[b * N + j] = t >= 2 ? vh[(b * T_ + t - 2) * N + j] : T(0);
      }
    }
    at::parallel_for(0, B * rc.count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const int64_t b = w / rc.count, c = w % rc.count;
        if (iters[b] < t) continue;
        T* __restrict__ Pc = P.data() + w * N;
        std::fill(Pc, Pc + N, T(0));
        const T* __restrict__ wv = W.data() + b * N;
        const T* __restrict__ vp = Vp.data() + b * N;
        const T* __restrict__ gvb = gv + b * N;
        const T* ut = uh + (b * T_ + t - 1) * M;
        const int64_t i1 = std::min(M, (c + 1) * rc.size);
        for (int64_t i = c * rc.size; i < i1; ++i) {
          const T* __restrict__ k = Kp + (b * M + i) * N;
          T* __restrict__ gk = g + (b * M + i) * N;
          const T ui = ut[i];
          // v_t half-step: column-softmax weights Q^v_ij
          constexpr int L = kLanes<T>;
          T accl[L];
          for (int l = 0; l < L; ++l) accl[l] = T(0);
          int64_t j = 0;
          for (; j + L <= N; j += L) {
            for (int l = 0; l < L; ++l) {
              const T q = gvb[j + l] * half_step_weight(k[j + l], ui, wv[j + l]);
              gk[j + l] -= q;
              accl[l] += q;
            }
          }
          T acc = T(0);
          for (int l = 0; l < L; ++l) acc += accl[l];
          for (; j < N; ++j) {
            const T q = gvb[j] * half_step_weight(k[j], ui, wv[j]);
            gk[j] -= q;
            acc += q;
          }
          const T gui = gu[b * M + i] - acc;
          ga[b * M + i] += gui;
          gu[b * M + i] = T(0);
          // u_t half-step: row-softmax weights Q^u_ij
          const T ci = ui - a[b * M + i];
          for (j = 0; j < N; ++j) {
            const T q = gui * half_step_weight(k[j], ci, vp[j]);
            gk[j] -= q;
            Pc[j] += q;
          }
        }
      }
    });
    // gbar(v_{t-1}) = -sum_i gu_i Q^u_ij; gb collects gbar(v_t) first
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        if (iters[b] < t) continue;
        for (int64_t j = 0; j < N; ++j) {
          gb[b * N + j] += gv[b * N + j];
          T s = T(0);
          for (int64_t c = 0; c < rc.count; ++c) s += P[(b * rc.count + c) * N + j];
          gv[b * N + j] = -s;
        }
      }
    });
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
