// WTI (weighted token-wise interaction) max-and-weigh step, shared by the CPU and CUDA
// kernels of wti_similarity (docs/operators.md, "wti_similarity").
//
// One text-video pair (i, j) is seen through a WtiPair: the raw token dot products
// raw[l, f] = <t_il, v_jf> at S[l * ld + f] (a block of a larger tile), the masks and
// the (softmaxed) weights. The masked similarity is, exactly as in the reference,
//     S_ij[l, f] = raw[l, f] * m_t[l] * m_v[f]      (masked entries are 0, not -inf)
//     s_ij       = 1/2 (sum_l a_t[l] max_f S[l, f] + sum_f a_v[f] max_l S[l, f]).
// Ties in a max go to the lowest index (strict ">" while scanning upwards), so the
// backward of every backend routes the gradient to the same entry.
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace nbretr {

template <typename acc_t>
struct WtiPair {
  const acc_t* S;   // raw dot products, row l at S + l * ld
  int64_t ld;
  const acc_t* mt;  // [L] text mask
  const acc_t* mv;  // [F] video mask
  const acc_t* at;  // [L] text weights
  const acc_t* av;  // [F] video weights
  int64_t L, F;

  NBRETR_HD acc_t s(int64_t l, int64_t f) const { return S[l * ld + f] * mt[l] * mv[f]; }
};

// max_f S[l, f] and its lowest arg-max (F >= 1)
template <typename acc_t>
NBRETR_HD void wti_row_max(const WtiPair<acc_t>& p, int64_t l, acc_t& best, int64_t& arg) {
  best = p.s(l, 0);
  arg = 0;
  for (int64_t f = 1; f < p.F; ++f) {
    const acc_t x = p.s(l, f);
    const bool gt = x > best;  // a select, not a branch: random data mispredicts
    best = gt ? x : best;
    arg = gt ? f : arg;
  }
}

// max_l S[l, f] and its lowest arg-max (L >= 1)
template <typename acc_t>
NBRETR_HD void wti_col_max(const WtiPair<acc_t>& p, int64_t f, acc_t& best, int64_t& arg) {
  best = p.s(0, f);
  arg = 0;
  for (int64_t l = 1; l < p.L; ++l) {
    const acc_t x = p.s(l, f);
    const bool gt = x > best;  // a select, not a branch: random data mispredicts
    best = gt ? x : best;
    arg = gt ? l : arg;
  }
}

// s_ij of one pair
template <typename acc_t>
NBRETR_HD acc_t wti_pair_score(const WtiPair<acc_t>& p) {
  acc_t t2v = 0, v2t = 0;
  acc_t m;
  int64_t a;
  for (int64_t l = 0; l < p.L; ++l) {
    wti_row_max(p, l, m, a);
    t2v += p.at[l] * m;
  }
  for (int64_t f = 0; f < p.F; ++f) {
    wti_col_max(p, f, m, a);
    v2t += p.av[f] * m;
  }
  return acc_t(0.5) * (t2v + v2t);
}

// dL/draw[l, f] carried by row l's max when f is its arg-max (wti_row_coef) and by column
// f's max when l is its arg-max (wti_col_coef), for half_g = dL/ds_ij / 2; where both
// land on one entry they add up (row's + column's). Then dL/dt_il += c * v_jf and
// dL/dv_jf += c * t_il, and the weights get d a_t[l] = half_g * (row l's max), d a_v[f] =
// half_g * (column f's max). Every backward takes its coefficients from here, so that all
// of them round alike.
template <typename acc_t>
NBRETR_HD acc_t wti_row_coef(const WtiPair<acc_t>& p, acc_t half_g, int64_t l, int64_t f) {
  return half_g * p.at[l] * p.mt[l] * p.mv[f];
}
template <typename acc_t>
NBRETR_HD acc_t wti_col_coef(const WtiPair<acc_t>& p, acc_t half_g, int64_t l, int64_t f) {
  return half_g * p.av[f] * p.mt[l] * p.mv[f];
}

}  // namespace nbretr
