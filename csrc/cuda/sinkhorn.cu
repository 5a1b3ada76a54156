// sinkhorn_log / sinkhorn_log_backward, CUDA.
//
// Forward, two paths:
//  - fused: a problem whose K (padded to N+1 columns against bank conflicts) and potentials
//    fit in one block's shared memory is solved there for all iterations; one launch for
//    the whole batch (one block per problem). Rows: one warp per row, lanes over columns;
//    columns: one warp per column, lanes over rows. Both reduce with the online
//    log-sum-exp of csrc/common/sinkhorn.h (warp shuffles of (max, sum) pairs).
//  - multi-block: per iteration one row-LSE launch (warp per row), one per-problem
//    decide/commit launch (tol test, u update, iters_done) and one column-LSE launch
//    (32-column tiles, 8 row lanes per column); the plan is K + u + v at the end.
// Backward: per iteration (newest first) a row launch (both half-steps' contributions to
// dK, the row gradient of u_t) and a column launch (gradient of v_{t-1}).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/sinkhorn.h"
#include "common/sinkhorn_checks.h"

namespace nbretr {
namespace {

using namespace nbretr::sinkhorn;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ Lse<T> warp_lse(Lse<T> st) {
  for (int off = 16; off > 0; off >>= 1) {
    Lse<T> o{__shfl_xor_sync(kFull, st.m, off), __shfl_xor_sync(kFull, st.s, off)};
    st = lse_merge(st, o);
  }
  return st;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int off = 16; off > 0; off >>= 1) x = sk_max(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

// ---------------------------------------------------------------------------------------
// fused path: one block per problem, everything in shared memory
template <typename T>
__global__ void sinkhorn_fused_kernel(T* __restrict__ K, const T* __restrict__ log_mu, const T* __restrict__ log_nu,
                                      T* __restrict__ u_out, T* __restrict__ v_out, int64_t* __restrict__ iters_out,
                                      T* __restrict__ u_hist, T* __restrict__ v_hist, int M, int N, int n_iters,
                                      bool use_tol, T tol) {
  extern __shared__ unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  const int ld = N | 1;  // odd row stride: the column phase's lanes (rows i) hit distinct banks
  T* us = Ks + static_cast<int64_t>(M) * ld;
  T* vs = us + M;
  T* Rs = vs + N;
  __shared__ T red[32];
  __shared__ int stop;

  const int64_t b = blockIdx.x;
  T* Kg = K + b * M * N;
  const T* a = log_mu + b * M;
  const T* bn = log_nu + b * N;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  for (int64_t e = tid; e < static_cast<int64_t>(M) * N; e += blockDim.x) {
    const int i = static_cast<int>(e / N), j = static_cast<int>(e - static_cast<int64_t>(i) * N);
    Ks[i * ld + j] = Kg[e];
  }
  for (int i = tid; i < M; i += blockDim.x) us[i] = T(0);
  for (int j = tid; j < N; j += blockDim.x) vs[j] = T(0);
  __syncthreads();

  int iters = 0;
  for (int t = 0; t < n_iters; ++t) {
    // row half-step: R_i = LSE_j(K_ij + v_j), and the tol error of iteration t
    T err = T(0);
    for (int i = warp; i < M; i += nwarps) {
      Lse<T> st = lse_empty<T>();
      for (int j = lane; j < N; j += 32) lse_push(st, Ks[i * ld + j] + vs[j]);
      st = warp_lse(st);
      const T r = lse_value(st);
      if (lane == 0) {
        Rs[i] = r;
        if (use_tol && t >= 1) err = sk_max(err, row_marginal_error(us[i], r, a[i]));
      }
    }
    if (use_tol && t >= 1) {
      err = warp_max(err);
      if (lane == 0) red[warp] = err;
      __syncthreads();
      if (warp == 0) {
        T e = lane < nwarps ? red[lane] : T(0);
        e = warp_max(e);
        if (lane == 0) stop = e < tol ? 1 : 0;
      }
    }
    __syncthreads();
    if (use_tol && t >= 1 && stop) break;  // uniform across the block
    for (int i = tid; i < M; i += blockDim.x) {
      const T ui = potential(a[i], Rs[i]);
      us[i] = ui;
      u_hist[(b * n_iters + t) * M + i] = ui;
    }
    __syncthreads();
    // column half-step: v_j = b_j - LSE_i(K_ij + u_i)
    for (int j = warp; j < N; j += nwarps) {
      Lse<T> st = lse_empty<T>();
      for (int i = lane; i < M; i += 32) lse_push(st, Ks[i * ld + j] + us[i]);
      st = warp_lse(st);
      if (lane == 0) {
        const T vj = potential(bn[j], lse_value(st));
        vs[j] = vj;
        v_hist[(b * n_iters + t) * N + j] = vj;
      }
    }
    __syncthreads();
    iters = t + 1;
  }
  for (int i = tid; i < M; i += blockDim.x) u_out[b * M + i] = us[i];
  for (int j = tid; j < N; j += blockDim.x) v_out[b * N + j] = vs[j];
  if (tid == 0) iters_out[b] = iters;
  for (int64_t e = tid; e < static_cast<int64_t>(M) * N; e += blockDim.x) {
    const int i = static_cast<int>(e / N), j = static_cast<int>(e - static_cast<int64_t>(i) * N);
    Kg[e] = Ks[i * ld + j] + us[i] + vs[j];
  }
}

// ---------------------------------------------------------------------------------------
// multi-block path
constexpr int kRowWarps = 8;   // rows per block in the row kernels (one warp each)
constexpr int kColTile = 32;   // columns per block in the column kernels
constexpr int kColLanes = 8;   // row lanes per column

// Non-negative floating values order like their bit patterns.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
}
__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

template <typename T>
__global__ void row_lse_kernel(const T* __restrict__ K, const T* __restrict__ v, const T* __restrict__ u,
                               const T* __restrict__ log_mu, const int* __restrict__ active, T* __restrict__ R,
                               T* __restrict__ err, int M, int N, int row_blocks, bool check_err) {
  const int64_t b = blockIdx.x / row_blocks;
  if (!active[b]) return;
  const int lane = threadIdx.x & 31;
  const int i = (blockIdx.x % row_blocks) * kRowWarps + (threadIdx.x >> 5);
  if (i >= M) return;
  const T* k = K + (b * M + i) * N;
  const T* vb = v + b * N;
  Lse<T> st = lse_empty<T>();
  for (int j = lane; j < N; j += 32) lse_push(st, k[j] + vb[j]);
  st = warp_lse(st);
  if (lane == 0) {
    const T r = lse_value(st);
    R[b * M + i] = r;
    if (check_err) atomic_max_nonneg(err + b, row_marginal_error(u[b * M + i], r, log_mu[b * M + i]));
  }
}

// One block per problem: the tol decision of iteration t, then u_{t+1} = a - R.
template <typename T>
__global__ void decide_commit_kernel(const T* __restrict__ R, const T* __restrict__ log_mu, T* __restrict__ u,
                                     T* __restrict__ u_hist, T* __restrict__ err, int* __restrict__ active,
                                     int64_t* __restrict__ iters, int M, int n_iters, int t, bool check_err, T tol) {
  const int64_t b = blockIdx.x;
  __shared__ int go;
  if (threadIdx.x == 0) {
    int g = active[b];
    if (g && check_err && err[b] < tol) g = 0;
    if (check_err) err[b] = T(0);
    if (g) iters[b] = t + 1;
    active[b] = g;
    go = g;
  }
  __syncthreads();
  if (!go) return;
  for (int i = threadIdx.x; i < M; i += blockDim.x) {
    const T ui = potential(log_mu[b * M + i], R[b * M + i]);
    u[b * M + i] = ui;
    u_hist[(b * n_iters + t) * M + i] = ui;
  }
}

template <typename T>
__global__ void col_lse_kernel(const T* __restrict__ K, const T* __restrict__ u, const T* __restrict__ log_nu,
                               const int* __restrict__ active, T* __restrict__ v, T* __restrict__ v_hist, int M,
                               int N, int col_blocks, int n_iters, int t) {
  const int64_t b = blockIdx.x / col_blocks;
  if (!active[b]) return;
  __shared__ T sm[kColLanes][kColTile];
  __shared__ T ss[kColLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = (blockIdx.x % col_blocks) * kColTile + tx;
  Lse<T> st = lse_empty<T>();
  if (j < N) {
    const T* kb = K + b * M * N;
    const T* ub = u + b * M;
    for (int i = ty; i < M; i += kColLanes) lse_push(st, kb[static_cast<int64_t>(i) * N + j] + ub[i]);
  }
  sm[ty][tx] = st.m;
  ss[ty][tx] = st.s;
  __syncthreads();
  if (ty == 0 && j < N) {
    for (int l = 1; l < kColLanes; ++l) st = lse_merge(st, Lse<T>{sm[l][tx], ss[l][tx]});
    const T vj = potential(log_nu[b * N + j], lse_value(st));
    v[b * N + j] = vj;
    v_hist[(b * n_iters + t) * N + j] = vj;
  }
}

// ---------------------------------------------------------------------------------------
// backward
template <typename T>
__global__ void backward_row_kernel(const T* __restrict__ K, T* __restrict__ gK, const T* __restrict__ log_mu,
                                    const T* __restrict__ log_nu, const T* __restrict__ u_hist,
                                    const T* __restrict__ v_hist, const int64_t* __restrict__ iters,
                                    const T* __restrict__ gu_init, const T* __restrict__ gv, T* __restrict__ GU,
                                    T* __restrict__ ga, int M, int N, int n_hist, int row_blocks, int t) {
  const int64_t b = blockIdx.x / row_blocks;
  if (iters[b] < t) return;
  const int lane = threadIdx.x & 31;
  const int i = (blockIdx.x % row_blocks) * kRowWarps + (threadIdx.x >> 5);
  if (i >= M) return;
  const T* k = K + (b * M + i) * N;
  T* gk = gK + (b * M + i) * N;
  const T* vt = v_hist + (b * n_hist + t - 1) * N;
  const T* vp = t >= 2 ? v_hist + (b * n_hist + t - 2) * N : nullptr;
  const T* bn = log_nu + b * N;
  const T* gvb = gv + b * N;
  const T ui = u_hist[(b * n_hist + t - 1) * M + i];
  // v_t half-step (column-softmax weights)
  T acc = T(0);
  for (int j = lane; j < N; j += 32) {
    const T q = gvb[j] * half_step_weight(k[j], ui, vt[j] - bn[j]);
    gk[j] -= q;
    acc += q;
  }
  acc = warp_sum(acc);
  const T gui = (iters[b] == t ? gu_init[b * M + i] : T(0)) - acc;
  // u_t half-step (row-softmax weights)
  const T ci = ui - log_mu[b * M + i];
  for (int j = lane; j < N; j += 32) gk[j] -= gui * half_step_weight(k[j], ci, vp ? vp[j] : T(0));
  if (lane == 0) {
    GU[b * M + i] = gui;
    ga[b * M + i] += gui;
  }
}

template <typename T>
__global__ void backward_col_kernel(const T* __restrict__ K, const T* __restrict__ log_mu,
                                    const T* __restrict__ u_hist, const T* __restrict__ v_hist,
                                    const int64_t* __restrict__ iters, const T* __restrict__ GU, T* __restrict__ gv,
                                    T* __restrict__ gb, int M, int N, int n_hist, int col_blocks, int t) {
  const int64_t b = blockIdx.x / col_blocks;
  if (iters[b] < t) return;
  __shared__ T sacc[kColLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = (blockIdx.x % col_blocks) * kColTile + tx;
  T acc = T(0);
  if (j < N) {
    const T vpj = t >= 2 ? v_hist[(b * n_hist + t - 2) * N + j] : T(0);
    const T* kb = K + b * M * N;
    const T* ut = u_hist + (b * n_hist + t - 1) * M;
    for (int i = ty; i < M; i += kColLanes) {
      const T ci = ut[i] - log_mu[b * M + i];
      acc += GU[b * M + i] * half_step_weight(kb[static_cast<int64_t>(i) * N + j], ci, vpj);
    }
  }
  sacc[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < N) {
    for (int l = 1; l < kColLanes; ++l) acc += sacc[l][tx];
    gb[b * N + j] += gv[b * N + j];
    gv[b * N + j] = -acc;
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename T>
size_t fused_smem_bytes(int64_t M, int64_t N) {
  return static_cast<size_t>((M * (N | 1) + 2 * M + N) * static_cast<int64_t>(sizeof(T)));
}

size_t max_smem_optin(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_cuda(
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu, int64_t n_iters, double eps,
    std::optional<double> tol) {
  check_sinkhorn_args(scores, log_mu, log_nu, n_iters, eps, tol, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(scores.device());
  const auto acc = sinkhorn_acc_type(scores);
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  NBRETR_CHECK_ARG(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && n_iters < (int64_t(1) << 31),
                   "sinkhorn_log", "M, N and n_iters must be < 2^31 on CUDA");
  at::Tensor K = at::div(scores.to(acc), eps).contiguous();
  const auto opts = K.options();
  at::Tensor u = at::zeros({B, M}, opts), v = at::zeros({B, N}, opts);
  at::Tensor iters = at::zeros({B}, opts.dtype(at::kLong));
  at::Tensor uh = at::zeros({B, n_iters, M}, opts), vh = at::zeros({B, n_iters, N}, opts);
  if (K.numel() == 0) return {K, u, v, iters, uh, vh};
  check_sinkhorn_masks(scores);
  const at::Tensor a = log_mu.to(acc).contiguous(), bn = log_nu.to(acc).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool use_tol = tol.has_value();
  const int Mi = static_cast<int>(M), Ni = static_cast<int>(N), Ti = static_cast<int>(n_iters);

  AT_DISPATCH_FLOATING_TYPES(acc, "sinkhorn_log_cuda", [&] {
    using T = scalar_t;
    const T tol_v = use_tol ? static_cast<T>(*tol) : T(0);
    const size_t smem = fused_smem_bytes<T>(M, N);
    auto kernel = sinkhorn_fused_kernel<T>;
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    if (smem + attr.sharedSizeBytes <= max_smem_optin(scores.get_device())) {  // dynamic + static
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
      const int threads = M * N >= 4096 ? 512 : 256;
      kernel<<<static_cast<unsigned>(B), threads, smem, stream>>>(
          K.mutable_data_ptr<T>(), a.const_data_ptr<T>(), bn.const_data_ptr<T>(), u.mutable_data_ptr<T>(),
          v.mutable_data_ptr<T>(), iters.mutable_data_ptr<int64_t>(), uh.mutable_data_ptr<T>(),
          vh.mutable_data_ptr<T>(), Mi, Ni, Ti, use_tol, tol_v);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor R = at::empty({B, M}, opts), err = at::zeros({B}, opts);
    at::Tensor active = at::ones({B}, opts.dtype(at::kInt));
    const int row_blocks = ceil_div(M, kRowWarps), col_blocks = ceil_div(N, kColTile);
    for (int t = 0; t < Ti; ++t) {
      const bool check = use_tol && t >= 1;
      row_lse_kernel<T><<<static_cast<unsigned>(B * row_blocks), kRowWarps * 32, 0, stream>>>(
          K.const_data_ptr<T>(), v.const_data_ptr<T>(), u.const_data_ptr<T>(), a.const_data_ptr<T>(),
          active.const_data_ptr<int>(), R.mutable_data_ptr<T>(), err.mutable_data_ptr<T>(), Mi, Ni, row_blocks,
          check);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      decide_commit_kernel<T><<<static_cast<unsigned>(B), 256, 0, stream>>>(
          R.const_data_ptr<T>(), a.const_data_ptr<T>(), u.mutable_data_ptr<T>(), uh.mutable_data_ptr<T>(),
          err.mutable_data_ptr<T>(), active.mutable_data_ptr<int>(), iters.mutable_data_ptr<int64_t>(), Mi, Ti, t,
          check, tol_v);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_lse_kernel<T><<<static_cast<unsigned>(B * col_blocks), dim3(kColTile, kColLanes), 0, stream>>>(
          K.const_data_ptr<T>(), u.const_data_ptr<T>(), bn.const_data_ptr<T>(), active.const_data_ptr<int>(),
          v.mutable_data_ptr<T>(), vh.mutable_data_ptr<T>(), Mi, Ni, col_blocks, Ti, t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    K.add_(u.unsqueeze(2)).add_(v.unsqueeze(1));
  });
  return {K, u, v, iters, uh, vh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_backward_cuda(
    const at::Tensor& grad_log_plan, const at::Tensor& grad_log_u, const at::Tensor& grad_log_v,
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu, const at::Tensor& u_hist,
    const at::Tensor& v_hist, const at::Tensor& iters_done, double eps) {
  check_sinkhorn_backward_args(grad_log_plan, grad_log_u, grad_log_v, scores, log_mu, log_nu, u_hist, v_hist,
                               iters_done, eps, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(scores.device());
  const auto acc = sinkhorn_acc_type(scores);
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  at::Tensor gK = grad_log_plan.contiguous().clone();
  const at::Tensor gu = (grad_log_u + grad_log_plan.sum(2)).contiguous();
  at::Tensor gv = (grad_log_v + grad_log_plan.sum(1)).contiguous();
  at::Tensor ga = at::zeros_like(gu), gb = at::zeros_like(gv);
  if (gK.numel() > 0 && iters_done.numel() > 0) {
    const int64_t t_max = iters_done.max().item<int64_t>();
    const at::Tensor K = at::div(scores.to(acc), eps).contiguous();
    const at::Tensor a = log_mu.to(acc).contiguous(), bn = log_nu.to(acc).contiguous();
    const at::Tensor uh = u_hist.contiguous(), vh = v_hist.contiguous(), it = iters_done.contiguous();
    at::Tensor GU = at::zeros_like(gu);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int Mi = static_cast<int>(M), Ni = static_cast<int>(N), Th = static_cast<int>(u_hist.size(1));
    const int row_blocks = ceil_div(M, kRowWarps), col_blocks = ceil_div(N, kColTile);
    AT_DISPATCH_FLOATING_TYPES(acc, "sinkhorn_log_backward_cuda", [&] {
      using T = scalar_t;
      for (int t = static_cast<int>(t_max); t >= 1; --t) {
        backward_row_kernel<T><<<static_cast<unsigned>(B * row_blocks), kRowWarps * 32, 0, stream>>>(
            K.const_data_ptr<T>(), gK.mutable_data_ptr<T>(), a.const_data_ptr<T>(), bn.const_data_ptr<T>(),
            uh.const_data_ptr<T>(), vh.const_data_ptr<T>(), it.const_data_ptr<int64_t>(), gu.const_data_ptr<T>(),
            gv.const_data_ptr<T>(), GU.mutable_data_ptr<T>(), ga.mutable_data_ptr<T>(), Mi, Ni, Th, row_blocks, t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_col_kernel<T><<<static_cast<unsigned>(B * col_blocks), dim3(kColTile, kColLanes), 0, stream>>>(
            K.const_data_ptr<T>(), a.const_data_ptr<T>(), uh.const_data_ptr<T>(), vh.const_data_ptr<T>(),
            it.const_data_ptr<int64_t>(), GU.const_data_ptr<T>(), gv.mutable_data_ptr<T>(), gb.mutable_data_ptr<T>(),
            Mi, Ni, Th, col_blocks, t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  gK.div_(eps);
  return {gK.to(scores.scalar_type()), ga.to(log_mu.scalar_type()), gb.to(log_nu.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CUDA, m) {
  m.impl("sinkhorn_log", &sinkhorn_log_cuda);
  m.impl("sinkhorn_log_backward", &sinkhorn_log_backward_cuda);
}

}  // namespace nbretr
