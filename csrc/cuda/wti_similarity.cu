// wti_similarity, CUDA. Two implementations; the wti_cuda kernel setting picks one per call
// (csrc/common/settings.h; nbretr.ops.kernel_settings(wti_cuda="fused")).
//
// "tiled" (the default): the driver of csrc/common/wti_tiled.h. Each tile of raw dot
// products (up to kTiledRows x kTiledCols entries) is one cuBLAS product (fp16/bf16 with
// an fp32 output); then one thread per line (a text token's row or a video frame's column
// of a pair's S block) runs the max scans of csrc/common/wti.h and one thread per pair
// weighs them; the backward recomputes the tile, writes each pair's arg-max coefficients
// into a dS tile (one thread per line) and takes dt, dv from two more products. Any L, F.
// Written after the first GPU run showed the fused kernel at 0.1-0.3x the torch path; its
// driver and per-line steps are tested on the CPU (`nbretr_testing.wti_tiled`); this
// launcher has not run yet.
//
// "fused": one block per (text block, video block) tile. The tile's texts' tokens
// (M = roundup16(nt*L) <= 128 rows) and videos' frames (N = roundup16(nv*F) <= 128 rows)
// are staged through shared memory in K-chunks; the raw dot products accumulate in a
// shared [M, N] float tile, on tensor cores (nvcuda::wmma m16n16k16, fp32 accumulators)
// for fp16/bf16 and with scalar FMAs for fp32/fp64. Then one thread per pair runs the
// max-and-weigh step on its [L, F] sub-block. Its backward: the same tile kernel
// recomputes S and writes, per pair, only the arg-maxes (int16, [Bt,Bv,L] and [Bt,Bv,F])
// and the maxima (for the weight gradients, two bmm's); a gather kernel then builds dt
// (one block per text token, over all videos) and, with the roles swapped, dv. Correct on
// an H200 (bench/RESULTS.md) but slow there; L, F <= 128.
//
// Neither saves anything in the forward, and no [Bt, Bv, L, F] buffer exists anywhere.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <tuple>

#include "common/settings.h"
#include "common/wti.h"
#include "common/wti_checks.h"
#include "common/wti_tiled.h"

namespace nbretr {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTile = 128;  // M, N <= 128 (so L, F <= 128 on CUDA)
constexpr int kMaxFragsPerWarp = (kMaxTile / 16) * (kMaxTile / 16) / kWarps;

template <typename T> struct WmmaType { using type = void; };
template <> struct WmmaType<at::Half> { using type = __half; };
template <> struct WmmaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t> constexpr bool use_wmma() {
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
}
// K-chunk staged per step and the shared row stride (padding against bank conflicts;
// for wmma a multiple of 8 halves so that every fragment pointer is 32-byte aligned)
template <typename scalar_t> constexpr int k_chunk() { return use_wmma<scalar_t>() ? 32 : (sizeof(scalar_t) == 8 ? 8 : 16); }
template <typename scalar_t> constexpr int k_ld() { return use_wmma<scalar_t>() ? k_chunk<scalar_t>() + 8 : k_chunk<scalar_t>() + 1; }
template <typename scalar_t> constexpr int s_pad() { return use_wmma<scalar_t>() ? 4 : 1; }

struct TileShape {
  int64_t Bt, Bv, L, F, D;
  int TB, VB, M, N;
};

template <typename scalar_t, typename acc_t>
size_t tile_smem_bytes(const TileShape& s) {
  return (size_t)(s.M + s.N) * k_ld<scalar_t>() * sizeof(scalar_t) + (size_t)s.M * (s.N + s_pad<scalar_t>()) * sizeof(acc_t);
}

// Stage one KC-wide slice [k0, k0 + KC) of the tile's text rows (As) and video rows (Bs)
// into shared memory, zero-filled past the tile and past D. All threads participate.
template <typename scalar_t, int KC, int LDK>
__device__ __forceinline__ void stage_chunk(const scalar_t* __restrict__ tb, const scalar_t* __restrict__ vb,
                                            scalar_t* As, scalar_t* Bs, const TileShape& s, int64_t rows_t,
                                            int64_t rows_v, int64_t k0, int tid) {
  for (int e = tid; e < (s.M + s.N) * KC; e += kThreads) {
    const int row = e / KC, kk = e % KC;
    const int64_t d = k0 + kk;
    scalar_t x = scalar_t(0.0f);
    if (row < s.M) {
      if (row < rows_t && d < s.D) x = tb[row * s.D + d];
      As[row * LDK + kk] = x;
    } else {
      const int r2 = row - s.M;
      if (r2 < rows_v && d < s.D) x = vb[r2 * s.D + d];
      Bs[r2 * LDK + kk] = x;
    }
  }
}

// kPrep = false: out[i, j] = s_ij. kPrep = true: per-pair arg-maxes and maxima.
template <typename scalar_t, typename acc_t, bool kPrep>
__global__ void __launch_bounds__(kThreads) wti_tile_kernel(
    const scalar_t* __restrict__ t, const scalar_t* __restrict__ v, const acc_t* __restrict__ mt,
    const acc_t* __restrict__ mv, const acc_t* __restrict__ wt, const acc_t* __restrict__ wv, const TileShape s,
    acc_t* __restrict__ out, int16_t* __restrict__ argf, int16_t* __restrict__ argl, acc_t* __restrict__ rowmax,
    acc_t* __restrict__ colmax) {
  constexpr int KC = k_chunk<scalar_t>(), LDK = k_ld<scalar_t>();
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = As + s.M * LDK;
  acc_t* Ss = reinterpret_cast<acc_t*>(Bs + s.N * LDK);
  const int ldS = s.N + s_pad<scalar_t>();

  const int64_t nbv = (s.Bv + s.VB - 1) / s.VB;
  const int64_t i0 = blockIdx.x / nbv * s.TB, j0 = blockIdx.x % nbv * s.VB;
  const int64_t nt = s.Bt - i0 < s.TB ? s.Bt - i0 : s.TB, nv = s.Bv - j0 < s.VB ? s.Bv - j0 : s.VB;
  const int64_t rows_t = nt * s.L, rows_v = nv * s.F;
  const scalar_t* tb = t + i0 * s.L * s.D;
  const scalar_t* vb = v + j0 * s.F * s.D;
  const int tid = threadIdx.x;

  if constexpr (use_wmma<scalar_t>()) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    using wt_t = typename WmmaType<scalar_t>::type;
    const int warp = tid / 32;
    const int nfn = s.N / 16, nfrag = (s.M / 16) * nfn;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMaxFragsPerWarp];
#pragma unroll
    for (int r = 0; r < kMaxFragsPerWarp; ++r) wmma::fill_fragment(acc[r], 0.0f);
    for (int64_t k0 = 0; k0 < s.D; k0 += KC) {
      __syncthreads();
      stage_chunk<scalar_t, KC, LDK>(tb, vb, As, Bs, s, rows_t, rows_v, k0, tid);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
#pragma unroll
        for (int r = 0; r < kMaxFragsPerWarp; ++r) {
          const int q = warp + r * kWarps;
          if (q < nfrag) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, wt_t, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, wt_t, wmma::col_major> b;
            wmma::load_matrix_sync(a, reinterpret_cast<const wt_t*>(As + (q / nfn) * 16 * LDK + kk), LDK);
            wmma::load_matrix_sync(b, reinterpret_cast<const wt_t*>(Bs + (q % nfn) * 16 * LDK + kk), LDK);
            wmma::mma_sync(acc[r], a, b, acc[r]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxFragsPerWarp; ++r) {
      const int q = warp + r * kWarps;
      if (q < nfrag) {
        wmma::store_matrix_sync(reinterpret_cast<float*>(Ss) + (q / nfn) * 16 * ldS + (q % nfn) * 16, acc[r], ldS,
                                wmma::mem_row_major);
      }
    }
#else
    __trap();  // fp16/bf16 tiles need sm_80+ (the host refuses older devices)
#endif
  } else {
    for (int e = tid; e < s.M * ldS; e += kThreads) Ss[e] = acc_t(0);
    for (int64_t k0 = 0; k0 < s.D; k0 += KC) {
      __syncthreads();
      stage_chunk<scalar_t, KC, LDK>(tb, vb, As, Bs, s, rows_t, rows_v, k0, tid);
      __syncthreads();
      for (int e = tid; e < s.M * s.N; e += kThreads) {  // each thread owns fixed entries
        const int m = e / s.N, n = e % s.N;
        acc_t a = Ss[m * ldS + n];
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) a += static_cast<acc_t>(As[m * LDK + kk]) * static_cast<acc_t>(Bs[n * LDK + kk]);
        Ss[m * ldS + n] = a;
      }
    }
  }
  __syncthreads();

  for (int64_t p = tid; p < nt * nv; p += kThreads) {
    const int64_t ii = p / nv, jj = p % nv, i = i0 + ii, j = j0 + jj;
    const WtiPair<acc_t> pair{Ss + ii * s.L * ldS + jj * s.F, ldS, mt + i * s.L, mv + j * s.F,
                              wt + i * s.L, wv + j * s.F, s.L, s.F};
    if constexpr (!kPrep) {
      out[i * s.Bv + j] = wti_pair_score(pair);
    } else {
      const int64_t pij = i * s.Bv + j;
      acc_t m;
      int64_t a;
      for (int64_t l = 0; l < s.L; ++l) {
        wti_row_max(pair, l, m, a);
        argf[pij * s.L + l] = static_cast<int16_t>(a);
        rowmax[pij * s.L + l] = m;
      }
      for (int64_t f = 0; f < s.F; ++f) {
        wti_col_max(pair, f, m, a);
        argl[pij * s.F + f] = static_cast<int16_t>(a);
        colmax[pij * s.F + f] = m;
      }
    }
  }
}

// Gradient of one side x (rows R per item, nx items) from the other side y (rows C per item,
// ny items), one block per (item a, row r):
//   dx[a, r] = sum_b 1/2 g(a, b) [ wx[a,r] mx[a,r] my[b,c*] y[b,c*]            c* = arg_xy[a,b,r]
//                                 + sum_{c: arg_yx[a,b,c] == r} wy[b,c] mx[a,r] my[b,c] y[b,c] ]
// with pair index a * sa + b * sb (texts x videos: sa = Bv, sb = 1; videos x texts: sa = 1,
// sb = Bv). The coefficients are wti_row_coef / wti_col_coef (csrc/common/wti.h).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) wti_gather_kernel(
    const acc_t* __restrict__ g, const scalar_t* __restrict__ y, const acc_t* __restrict__ mx,
    const acc_t* __restrict__ wx, const acc_t* __restrict__ my, const acc_t* __restrict__ wy,
    const int16_t* __restrict__ arg_xy, const int16_t* __restrict__ arg_yx, int64_t nx, int64_t ny, int64_t R,
    int64_t C, int64_t D, int64_t sa, int64_t sb, scalar_t* __restrict__ dx) {
  const int64_t a = blockIdx.x / R, r = blockIdx.x % R;
  const acc_t mxr = mx[a * R + r], wxr = wx[a * R + r];
  for (int64_t d0 = 0; d0 < D; d0 += kThreads) {
    const int64_t d = d0 + threadIdx.x;
    acc_t acc = 0;
    for (int64_t b = 0; b < ny; ++b) {
      const int64_t pab = a * sa + b * sb;
      const acc_t half_g = acc_t(0.5) * g[pab];
      if (half_g == acc_t(0)) continue;
      const int64_t cs = arg_xy[pab * R + r];
      const acc_t c_row = half_g * wxr * mxr * my[b * C + cs];
      if (c_row != acc_t(0) && d < D) acc += c_row * static_cast<acc_t>(y[(b * C + cs) * D + d]);
      for (int64_t c = 0; c < C; ++c) {
        if (arg_yx[pab * C + c] != r) continue;
        const acc_t c_col = half_g * wy[b * C + c] * mxr * my[b * C + c];
        if (c_col != acc_t(0) && d < D) acc += c_col * static_cast<acc_t>(y[(b * C + c) * D + d]);
      }
    }
    if (d < D) dx[(a * R + r) * D + d] = static_cast<scalar_t>(acc);
  }
}

TileShape tile_shape(const WtiDims& d) {
  NBRETR_CHECK_ARG(d.L <= kMaxTile && d.F <= kMaxTile, "wti_similarity", "the CUDA kernel supports at most ",
                   kMaxTile, " tokens per text and frames per video, got L=", d.L, " and F=", d.F,
                   "; use backend='torch' (or the CPU kernel) for longer sequences");
  TileShape s{d.Bt, d.Bv, d.L, d.F, d.D, 0, 0, 0, 0};
  s.TB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxTile / d.L, d.Bt)));
  s.VB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxTile / d.F, d.Bv)));
  s.M = static_cast<int>((s.TB * d.L + 15) / 16 * 16);
  s.N = static_cast<int>((s.VB * d.F + 15) / 16 * 16);
  return s;
}

struct Prepared {
  at::Tensor t, v, mt, mv, wt, wv;
};

Prepared prepare(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight, const at::Tensor& v,
                 const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const auto acc = wti_acc_type(t.scalar_type());
  return {t.contiguous(), v.contiguous(), t_mask.to(acc).contiguous(), v_mask.to(acc).contiguous(),
          t_weight.to(acc).contiguous(), v_weight.to(acc).contiguous()};
}

void check_arch(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
    NBRETR_CHECK_ARG(major >= 8, "wti_similarity", "float16/bfloat16 inputs need a GPU of compute capability 8.0 "
                     "or newer on CUDA (tensor-core tiles); cast t and v to torch.float32");
  }
}

template <typename scalar_t, bool kPrep>
void launch_tiles(const Prepared& p, const TileShape& s, at::Tensor out, at::Tensor argf, at::Tensor argl,
                  at::Tensor rowmax, at::Tensor colmax) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const size_t smem = tile_smem_bytes<scalar_t, acc_t>(s);
  auto kernel = wti_tile_kernel<scalar_t, acc_t, kPrep>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = ((s.Bt + s.TB - 1) / s.TB) * ((s.Bv + s.VB - 1) / s.VB);
  NBRETR_CHECK_ARG(blocks <= INT32_MAX, "wti_similarity", "too many (text, video) tiles (", blocks,
                   ") for one launch; split the batch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p.t.const_data_ptr<scalar_t>(), p.v.const_data_ptr<scalar_t>(), p.mt.const_data_ptr<acc_t>(),
      p.mv.const_data_ptr<acc_t>(), p.wt.const_data_ptr<acc_t>(), p.wv.const_data_ptr<acc_t>(), s,
      kPrep ? nullptr : out.mutable_data_ptr<acc_t>(), kPrep ? argf.mutable_data_ptr<int16_t>() : nullptr,
      kPrep ? argl.mutable_data_ptr<int16_t>() : nullptr, kPrep ? rowmax.mutable_data_ptr<acc_t>() : nullptr,
      kPrep ? colmax.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- "tiled" -------------------------------------------------------------------------

constexpr int64_t kTiledRows = 2048, kTiledCols = 2048;  // S and dS tiles of 16 MiB (fp32)
constexpr int kLineThreads = 256;  // one thread per line (row or column) of a pair's block

// Row work items [0, rows) then column work items [rows, rows + cols) in one grid (the
// forward's maxes: any order); one thread each (csrc/common/wti_tiled.h numbers them).
template <typename acc_t>
__global__ void wti_tiled_maxes_kernel(WtiTileArgs<acc_t> a) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = a.row_items();
  if (q < rows)
    wti_tile_row_max(a, q);
  else if (q < rows + a.col_items())
    wti_tile_col_max(a, q - rows);
}

template <typename acc_t>
__global__ void wti_tiled_score_kernel(WtiTileArgs<acc_t> a) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < a.pairs()) wti_tile_score(a, p);
}

template <typename acc_t>
__global__ void wti_tiled_row_grad_kernel(WtiTileArgs<acc_t> a) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < a.row_items()) wti_tile_row_grad(a, q);
}

template <typename acc_t>
__global__ void wti_tiled_col_grad_kernel(WtiTileArgs<acc_t> a) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < a.col_items()) wti_tile_col_grad(a, q);
}

// The launches of csrc/common/wti_tiled.h's driver, in its order, on one stream (the
// column gradients run after the row gradients, whose dS entries they add to).
struct CudaLineLaunch {
  cudaStream_t stream;
  static unsigned blocks(int64_t items) { return static_cast<unsigned>((items + kLineThreads - 1) / kLineThreads); }
  template <typename acc_t>
  void maxes(const WtiTileArgs<acc_t>& a) {
    wti_tiled_maxes_kernel<acc_t><<<blocks(a.row_items() + a.col_items()), kLineThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename acc_t>
  void scores(const WtiTileArgs<acc_t>& a) {
    wti_tiled_score_kernel<acc_t><<<blocks(a.pairs()), kLineThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename acc_t>
  void row_grads(const WtiTileArgs<acc_t>& a) {
    wti_tiled_row_grad_kernel<acc_t><<<blocks(a.row_items()), kLineThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename acc_t>
  void col_grads(const WtiTileArgs<acc_t>& a) {
    wti_tiled_col_grad_kernel<acc_t><<<blocks(a.col_items()), kLineThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// the wti_cuda setting (csrc/common/settings.h): "fused" or "tiled" (the default)
bool use_fused() { return kernel_settings().wti_cuda_fused.load(std::memory_order_relaxed); }

// ---- registrations ---------------------------------------------------------------------

at::Tensor wti_similarity_cuda(const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
                               const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(t.device());
  const auto acc = wti_acc_type(t.scalar_type());
  if (!use_fused()) {
    at::NoGradGuard no_grad;
    CudaLineLaunch launch{c10::cuda::getCurrentCUDAStream()};
    return wti_tiled_forward(t, t_mask, t_weight, v, v_mask, v_weight, d, kTiledRows, kTiledCols,
                             half_mm_out_float(t.scalar_type()), launch);
  }
  auto out = at::empty({d.Bt, d.Bv}, t.options().dtype(acc));
  if (d.Bt == 0 || d.Bv == 0) return out;
  const TileShape s = tile_shape(d);
  check_arch(t);
  const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "wti_similarity_cuda", [&] {
    launch_tiles<scalar_t, false>(p, s, out, none, none, none, none);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wti_similarity_backward_cuda(
    const at::Tensor& grad, const at::Tensor& t, const at::Tensor& t_mask, const at::Tensor& t_weight,
    const at::Tensor& v, const at::Tensor& v_mask, const at::Tensor& v_weight) {
  const WtiDims d = check_wti_args(t, t_mask, t_weight, v, v_mask, v_weight, c10::DeviceType::CUDA);
  check_wti_grad(grad, d, t);
  c10::cuda::CUDAGuard guard(t.device());
  at::NoGradGuard no_grad;
  if (!use_fused()) {
    CudaLineLaunch launch{c10::cuda::getCurrentCUDAStream()};
    return wti_tiled_backward(grad, t, t_mask, t_weight, v, v_mask, v_weight, d, kTiledRows, kTiledCols,
                              half_mm_out_float(t.scalar_type()),
                              launch);
  }
  const auto acc = wti_acc_type(t.scalar_type());
  if (d.Bt == 0 || d.Bv == 0 || d.D == 0) {
    return {at::zeros_like(t, at::MemoryFormat::Contiguous), at::zeros_like(t_weight, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous), at::zeros_like(v_weight, at::MemoryFormat::Contiguous)};
  }
  const TileShape s = tile_shape(d);
  check_arch(t);
  const Prepared p = prepare(t, t_mask, t_weight, v, v_mask, v_weight);
  const at::Tensor g = grad.to(acc).contiguous();
  auto argf = at::empty({d.Bt, d.Bv, d.L}, t.options().dtype(at::kShort));
  auto argl = at::empty({d.Bt, d.Bv, d.F}, t.options().dtype(at::kShort));
  auto rowmax = at::empty({d.Bt, d.Bv, d.L}, t.options().dtype(acc));
  auto colmax = at::empty({d.Bt, d.Bv, d.F}, t.options().dtype(acc));
  auto gt = at::empty({d.Bt, d.L, d.D}, t.options().memory_format(at::MemoryFormat::Contiguous));
  auto gv = at::empty({d.Bv, d.F, d.D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor none;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "wti_similarity_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_tiles<scalar_t, true>(p, s, none, argf, argl, rowmax, colmax);
    // texts: x = t (R = L) against y = v (C = F); pair index i * Bv + j
    wti_gather_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.Bt * d.L), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), p.v.const_data_ptr<scalar_t>(), p.mt.const_data_ptr<acc_t>(),
        p.wt.const_data_ptr<acc_t>(), p.mv.const_data_ptr<acc_t>(), p.wv.const_data_ptr<acc_t>(),
        argf.const_data_ptr<int16_t>(), argl.const_data_ptr<int16_t>(), d.Bt, d.Bv, d.L, d.F, d.D, d.Bv, 1,
        gt.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // videos: x = v (R = F) against y = t (C = L); pair index i * Bv + j with a = j, b = i
    wti_gather_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.Bv * d.F), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), p.t.const_data_ptr<scalar_t>(), p.mv.const_data_ptr<acc_t>(),
        p.wv.const_data_ptr<acc_t>(), p.mt.const_data_ptr<acc_t>(), p.wt.const_data_ptr<acc_t>(),
        argl.const_data_ptr<int16_t>(), argf.const_data_ptr<int16_t>(), d.Bv, d.Bt, d.F, d.L, d.D, 1, d.Bv,
        gv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // weight gradients: d a_t[i,l] = 1/2 sum_j g_ij rowmax_ij[l], d a_v[j,f] = 1/2 sum_i g_ij colmax_ij[f]
  auto gwt = at::bmm(g.unsqueeze(1), rowmax).squeeze(1).mul_(0.5);
  auto gwv = at::bmm(g.t().unsqueeze(1), colmax.permute({1, 0, 2})).squeeze(1).mul_(0.5);
  return {gt, gwt.to(t_weight.scalar_type()), gv, gwv.to(v_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(nbretr, CUDA, m) {
  m.impl("wti_similarity", &wti_similarity_cuda);
  m.impl("wti_similarity_backward", &wti_similarity_backward_cuda);
}

}  // namespace nbretr
