// Sliding-window GQA attention on CUDA: forward and backward, fp16/bf16 in, fp32 accumulation.
//
// One thread block per (query tile of BQ rows, head, batch); 8 warps, each owning BQ/8 query
// rows. Key tiles of 32 rows are staged in shared memory; in the score phase lane l owns key l of
// the tile, in the accumulation phase lane l owns head-dim columns [l*D/32, (l+1)*D/32).
// Queries may be fewer than keys (a.Sq <= a.S, the last positions): blocks cover query rows,
// masks and key tiles work on positions (row + S - Sq).
// Only tiles from lo[first query] to the last query are visited (blocks outside the window or
// the document are never read). GQA: head h reads kv head h / (H/KV) directly.
// The backward recomputes scores from the saved log-sum-exp; dK/dV of a tile are summed over the
// block's warps in shared memory, then added to fp32 global buffers with atomics.
//
// These kernels use SIMT FMAs, not tensor cores: a correct baseline, not the fastest possible.
#include <cmath>
#include <string>

#include "attn_cuda_api.h"
#include "attn_cuda_mma.cuh"
#include "sc2_device.cuh"

namespace {

constexpr int BQ = 64;      // query rows per block
constexpr int BKT = 32;     // key rows per tile (one per lane)
constexpr int WARPS = 8;
constexpr int ROWS = BQ / WARPS;
constexpr unsigned FULL = sc2::kFullMask;

using sc2::warp_max;
using sc2::warp_sum;
template <typename T> __device__ __forceinline__ float tof(T x) { return sc2::to_float(x); }
template <typename T> __device__ __forceinline__ T fromf(float x) { return sc2::from_float<T>(x); }

struct Params {
  CudaAttnArgs a;
  float scale2;  // softmax scale * log2(e)
};

__device__ __forceinline__ bool allowed(const CudaAttnArgs& a, int64_t b, int64_t i, int64_t j) {
  if (j > i || j < a.lo[b * a.S + i]) return false;
  if (a.by_id != nullptr && a.by_id[b]) return a.doc[b * a.S + i] == a.doc[b * a.S + j];
  return true;
}

template <typename T, int D>
__global__ void __launch_bounds__(WARPS * 32) forward_kernel(Params p) {
  constexpr int KP = D + 2;  // padded K row: lane l reads row l without bank conflicts
  constexpr int CPL = D / 32;
  SC2_DYNAMIC_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + BQ * D;
  T* Vs = Ks + BKT * KP;
  const CudaAttnArgs& a = p.a;
  const int64_t qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (a.H / a.KV), t0 = qb * BQ, i0 = t0 + (a.S - a.Sq);  // row, position
  const int nq = static_cast<int>(a.Sq - t0 < BQ ? a.Sq - t0 : BQ);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);

  for (int e = tid; e < BQ * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    Qs[e] = r < nq ? q[((b * a.Sq + t0 + r) * a.H + h) * D + c] : fromf<T>(0.0f);
  }
  float o[ROWS][CPL], m[ROWS], l[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) o[r][c] = 0.0f;
  }
  const int64_t klo = a.lo[b * a.S + i0], khi = i0 + nq;
  for (int64_t j0 = klo; j0 < khi; j0 += BKT) {
    __syncthreads();  // Q loaded / previous tile consumed
    for (int e = tid; e < BKT * D; e += blockDim.x) {
      const int jj = e / D, c = e % D;
      const int64_t j = j0 + jj;
      const bool in = j < khi;
      const int64_t off = ((b * a.S + j) * a.KV + g) * D + c;
      Ks[jj * KP + c] = in ? k[off] : fromf<T>(0.0f);
      Vs[jj * D + c] = in ? v[off] : fromf<T>(0.0f);
    }
    __syncthreads();
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
    for (int c = 0; c < D; ++c) {
      const float kc = tof(Ks[lane * KP + c]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[r] += tof(Qs[(warp * ROWS + r) * D + c]) * kc;
    }
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = warp * ROWS + r;
      const int64_t i = i0 + row;
      const bool ok = row < nq && j < khi && allowed(a, b, i, j);
      const float x = ok ? s[r] * p.scale2 : -INFINITY;
      const float mx = warp_max(x);
      if (mx == -INFINITY) {  // the same on every lane: no divergence
        s[r] = 0.0f;
        continue;
      }
      const float mnew = fmaxf(m[r], mx);
      const float alpha = exp2f(m[r] - mnew);  // 0 while m is -inf
      const float pj = ok ? exp2f(x - mnew) : 0.0f;
      l[r] = l[r] * alpha + warp_sum(pj);
      m[r] = mnew;
#pragma unroll
      for (int c = 0; c < CPL; ++c) o[r][c] *= alpha;
      s[r] = pj;
    }
    for (int jj = 0; jj < BKT; ++jj) {
      float vc[CPL];
#pragma unroll
      for (int c = 0; c < CPL; ++c) vc[c] = tof(Vs[jj * D + lane * CPL + c]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float pj = __shfl_sync(FULL, s[r], jj);
#pragma unroll
        for (int c = 0; c < CPL; ++c) o[r][c] += pj * vc[c];
      }
    }
  }
  T* out = static_cast<T*>(a.o);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = warp * ROWS + r;
    if (row >= nq) continue;
    const int64_t t = t0 + row;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int c = 0; c < CPL; ++c) out[((b * a.Sq + t) * a.H + h) * D + lane * CPL + c] = fromf<T>(o[r][c] * inv);
    if (lane == 0) a.lse[(b * a.H + h) * a.Sq + t] = m[r] + log2f(l[r]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(WARPS * 32) backward_kernel(Params p) {
  constexpr int KP = D + 2;
  constexpr int CPL = D / 32;
  SC2_DYNAMIC_SMEM(smem);
  float* dKs = reinterpret_cast<float*>(smem);  // BKT * D
  float* dVs = dKs + BKT * D;                    // BKT * D
  T* Qs = reinterpret_cast<T*>(dVs + BKT * D);   // BQ * D
  T* dOs = Qs + BQ * D;                          // BQ * D
  T* Ks = dOs + BQ * D;                          // BKT * KP
  T* Vs = Ks + BKT * KP;                         // BKT * KP
  const CudaAttnArgs& a = p.a;
  const int64_t qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (a.H / a.KV), t0 = qb * BQ, i0 = t0 + (a.S - a.Sq);  // row, position
  const int nq = static_cast<int>(a.Sq - t0 < BQ ? a.Sq - t0 : BQ);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* dout = static_cast<const T*>(a.dout);

  for (int e = tid; e < BQ * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    const int64_t off = ((b * a.Sq + t0 + r) * a.H + h) * D + c;
    Qs[e] = r < nq ? q[off] : fromf<T>(0.0f);
    dOs[e] = r < nq ? dout[off] : fromf<T>(0.0f);
  }
  float lse[ROWS], delta[ROWS], dq[ROWS][CPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = warp * ROWS + r;
    const int64_t idx = (b * a.H + h) * a.Sq + t0 + row;
    lse[r] = row < nq ? a.lse[idx] : 0.0f;
    delta[r] = row < nq ? a.delta[idx] : 0.0f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) dq[r][c] = 0.0f;
  }
  const int64_t klo = a.lo[b * a.S + i0], khi = i0 + nq;
  for (int64_t j0 = klo; j0 < khi; j0 += BKT) {
    __syncthreads();
    for (int e = tid; e < BKT * D; e += blockDim.x) {
      const int jj = e / D, c = e % D;
      const int64_t j = j0 + jj;
      const bool in = j < khi;
      const int64_t off = ((b * a.S + j) * a.KV + g) * D + c;
      Ks[jj * KP + c] = in ? k[off] : fromf<T>(0.0f);
      Vs[jj * KP + c] = in ? v[off] : fromf<T>(0.0f);
      dKs[e] = 0.0f;
      dVs[e] = 0.0f;
    }
    __syncthreads();
    float s[ROWS], dp[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = dp[r] = 0.0f;
    for (int c = 0; c < D; ++c) {
      const float kc = tof(Ks[lane * KP + c]), vc = tof(Vs[lane * KP + c]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        s[r] += tof(Qs[(warp * ROWS + r) * D + c]) * kc;
        dp[r] += tof(dOs[(warp * ROWS + r) * D + c]) * vc;
      }
    }
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = warp * ROWS + r;
      const bool ok = row < nq && j < khi && allowed(a, b, i0 + row, j);
      const float pr = ok ? exp2f(s[r] * p.scale2 - lse[r]) : 0.0f;
      s[r] = pr;                        // P
      dp[r] = pr * (dp[r] - delta[r]);  // dS, w.r.t. the scaled scores
    }
    for (int jj = 0; jj < BKT; ++jj) {
      float kc[CPL], ak[CPL], av[CPL];
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        kc[c] = tof(Ks[jj * KP + lane * CPL + c]);
        ak[c] = av[c] = 0.0f;
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float dsj = __shfl_sync(FULL, dp[r], jj);
        const float pj = __shfl_sync(FULL, s[r], jj);
        const int rowoff = (warp * ROWS + r) * D + lane * CPL;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          dq[r][c] += dsj * kc[c];
          ak[c] += dsj * tof(Qs[rowoff + c]);
          av[c] += pj * tof(dOs[rowoff + c]);
        }
      }
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        atomicAdd(&dKs[jj * D + lane * CPL + c], ak[c]);
        atomicAdd(&dVs[jj * D + lane * CPL + c], av[c]);
      }
    }
    __syncthreads();
    for (int e = tid; e < BKT * D; e += blockDim.x) {
      const int jj = e / D, c = e % D;
      const int64_t jk = j0 + jj;
      if (jk >= khi) continue;
      const int64_t off = ((b * a.S + jk) * a.KV + g) * D + c;
      atomicAdd(&a.dk[off], dKs[e] * a.scale);
      atomicAdd(&a.dv[off], dVs[e]);
    }
  }
  T* dqo = static_cast<T*>(a.dq);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = warp * ROWS + r;
    if (row >= nq) continue;
#pragma unroll
    for (int c = 0; c < CPL; ++c)
      dqo[((b * a.Sq + t0 + row) * a.H + h) * D + lane * CPL + c] = fromf<T>(dq[r][c] * a.scale);
  }
}

std::string check_device() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  if (n == 0) return "no CUDA device";
  return "";
}

template <typename T, int D>
std::string launch(const CudaAttnArgs& a, bool fwd) {
  if (a.kernel == 0) return sc2_mma::launch<T, D>(a, fwd);
  Params p{a, a.scale * 1.4426950408889634f};
  const dim3 grid(static_cast<unsigned>((a.Sq + BQ - 1) / BQ), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.B));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  constexpr int KP = D + 2;
  cudaError_t err;
  if (fwd) {
    const size_t bytes = sizeof(T) * (BQ * D + BKT * KP + BKT * D);
    err = cudaFuncSetAttribute(forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes));
    if (err == cudaSuccess) {
      SC2_LAUNCH(grid, WARPS * 32, bytes, stream, forward_kernel<T, D>)(p);
      err = cudaGetLastError();
    }
  } else {
    const size_t bytes = sizeof(float) * 2 * BKT * D + sizeof(T) * (2 * BQ * D + 2 * BKT * KP);
    err = cudaFuncSetAttribute(backward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes));
    if (err == cudaSuccess) {
      SC2_LAUNCH(grid, WARPS * 32, bytes, stream, backward_kernel<T, D>)(p);
      err = cudaGetLastError();
    }
  }
  return err == cudaSuccess ? "" : std::string("CUDA attention kernel: ") + cudaGetErrorString(err);
}

std::string dispatch(const CudaAttnArgs& a, bool fwd) {
  std::string err = check_device();
  if (!err.empty()) return err;
  if (a.D != 64 && a.D != 128) return "CUDA attention supports head dim 64 or 128, got " + std::to_string(a.D);
  if (a.dtype == 0) return a.D == 64 ? launch<__half, 64>(a, fwd) : launch<__half, 128>(a, fwd);
  if (a.dtype == 1)
    return a.D == 64 ? launch<__nv_bfloat16, 64>(a, fwd) : launch<__nv_bfloat16, 128>(a, fwd);
  return "CUDA attention dtype code must be 0 (fp16) or 1 (bf16)";
}

}  // namespace

std::string sc2_cuda_forward(const CudaAttnArgs& a) { return dispatch(a, true); }
std::string sc2_cuda_backward(const CudaAttnArgs& a) { return dispatch(a, false); }
std::string sc2_cuda_device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    return cudaGetErrorString(err);
  }
  return "";
}
