// Log-domain Sinkhorn (docs/operators.md): the per-element math shared by the CPU
// (csrc/cpu/sinkhorn.cpp) and CUDA (csrc/cuda/sinkhorn.cu) kernels, so that the CPU tests
// exercise the code the GPU runs.
//
// Notation (one problem): K_ij = scores_ij / eps, a = log_mu, b = log_nu, u_0 = v_0 = 0,
//   u_t = a - LSE_j(K_ij + v_{t-1,j})        (row half-step)
//   v_t = b - LSE_i(K_ij + u_t,i)            (column half-step)
//   log_plan = K + u_T + v_T.
// Backward (exact for the iterations run), with Q^v_t[i,j] = exp(K_ij + u_t,i + v_t,j - b_j)
// (column softmax of the v half-step) and Q^u_t[i,j] = exp(K_ij + v_{t-1,j} + u_t,i - a_i)
// (row softmax of the u half-step):
//   gbar(v_t) -> gb += gv;  gK -= gv_j Q^v_ij;  gu_t,i -= sum_j gv_j Q^v_ij
//   gbar(u_t) -> ga += gu;  gK -= gu_i Q^u_ij;  gv_{t-1,j} = -sum_i gu_i Q^u_ij
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

// Host: force inlining, so the CPU kernels' vectorised loops (some built for AVX2 with a
// target attribute) never call these out of line.
#if defined(__CUDACC__) || defined(__HIPCC__) || !(defined(__GNUC__) || defined(__clang__))
#define NBRETR_SK_HD NBRETR_HD
#else
#define NBRETR_SK_HD inline __attribute__((always_inline))
#endif

namespace nbretr {
namespace sinkhorn {

template <typename T>
NBRETR_SK_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(x) for the kernels' inner loops. float: on the GPU the hardware exp; on the host a
// branch-free Cephes-style polynomial (rel. error ~2 ulp, 0 below the smallest normal
// result, exp(-inf) = 0) that the compiler vectorises, unlike std::exp. double: exp.
NBRETR_SK_HD float sk_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float lo = -87.33654475f;  // exp(lo) = smallest normal float
  const float hi = 88.37626266f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(xc / ln2) with the 1.5 * 2^23 trick (round-to-nearest, vectorisable)
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  const float out = y * pow2n;
  return x < lo ? 0.0f : out;  // also maps -inf (masked entries) to exactly 0
#endif
}

NBRETR_SK_HD double sk_exp(double x) { return exp(x); }

NBRETR_SK_HD float sk_log(float x) { return logf(x); }
NBRETR_SK_HD double sk_log(double x) { return log(x); }

NBRETR_SK_HD float sk_max(float a, float b) { return a > b ? a : b; }
NBRETR_SK_HD double sk_max(double a, double b) { return a > b ? a : b; }

// Online log-sum-exp state: LSE = m + log(s), s = sum exp(x - m). Empty: m = -inf, s = 0.
template <typename T>
struct Lse {
  T m;
  T s;
};

template <typename T>
NBRETR_SK_HD Lse<T> lse_empty() {
  return {neg_inf<T>(), T(0)};
}

// Push one value. -inf values (masked entries) leave the state unchanged.
template <typename T>
NBRETR_SK_HD void lse_push(Lse<T>& st, T x) {
  if (x == neg_inf<T>()) return;
  if (x > st.m) {
    st.s = st.s * sk_exp(st.m - x) + T(1);  // exp(-inf) = 0 on the empty state
    st.m = x;
  } else {
    st.s += sk_exp(x - st.m);
  }
}

// Merge two partial states (order-independent up to rounding).
template <typename T>
NBRETR_SK_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  if (a.m == neg_inf<T>()) return b;
  if (b.m == neg_inf<T>()) return a;
  if (a.m >= b.m) return {a.m, a.s + b.s * sk_exp(b.m - a.m)};
  return {b.m, b.s + a.s * sk_exp(a.m - b.m)};
}

template <typename T>
NBRETR_SK_HD T lse_value(Lse<T> st) {
  return st.m + sk_log(st.s);
}

// Two-pass form (max known): LSE = m + log(sum).
template <typename T>
NBRETR_SK_HD T lse_from(T m, T sum) {
  return m + sk_log(sum);
}

// Row-marginal error of row i after a full iteration t, from the next row LSE
// r_i = LSE_j(K_ij + v_t,j): the plan's row sum is exp(u_t,i + r_i).
template <typename T>
NBRETR_SK_HD T row_marginal_error(T u, T r, T log_mu) {
  const T d = sk_exp(u + r) - sk_exp(log_mu);
  return d < T(0) ? -d : d;
}

// The potential after a half-step: log marginal minus the LSE.
template <typename T>
NBRETR_SK_HD T potential(T log_marginal, T lse) {
  return log_marginal - lse;
}

// Softmax weight of entry (i, j) in a half-step: exp(K_ij + p_i + q_j - log_marginal),
// with (p, q, marginal) = (u_t, v_t, b_j) for the v half-step and (u_t, v_{t-1}, a_i)
// for the u half-step.
template <typename T>
NBRETR_SK_HD T half_step_weight(T k, T p, T q_minus_marginal) {
  return sk_exp(k + p + q_minus_marginal);
}

}  // namespace sinkhorn
}  // namespace nbretr
