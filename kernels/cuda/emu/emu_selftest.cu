// Self-tests of the CUDA emulator: kernels written as for a GPU (through sc2_device.cuh), compiled
// only into the emulator module (-x c++ -DSC2_CUDA_EMULATION). The Python tests compare their
// results with torch and check that faulty kernels are rejected.
#include "emu_selftest.h"

#include <cstring>

#include "../sc2_device.cuh"

namespace {

constexpr unsigned FULL = 0xffffffffu;

template <typename T> __device__ uint32_t pair(const T* p, int i0, int i1) {
  return sc2::bits(p[i0]) | (sc2::bits(p[i1]) << 16);
}

// ---- mma / ldmatrix --------------------------------------------------------------------------
template <typename T>
__global__ void mma_kernel(const T* A, const T* B, const float* C, float* D, int mode) {
  // Dynamic shared memory, as the attention kernels use (static __shared__ inside a function
  // template is not poisoned by the emulator: see cuda_emu.h).
  SC2_DYNAMIC_SMEM(smem);
  uint16_t* As = reinterpret_cast<uint16_t*>(smem);
  uint16_t* Bs = As + 16 * 16;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const int n = mode >= 3 ? 16 : 8;  // columns of B, C and D
  uint32_t a[4], b[2][2];
  if (mode == 0) {  // fragments from the PTX ISA formulas; B is (k, n) row-major, n = 8
    a[0] = pair(A, g * 16 + 2 * t, g * 16 + 2 * t + 1);
    a[1] = pair(A, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1);
    a[2] = pair(A, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9);
    a[3] = pair(A, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9);
    b[0][0] = pair(B, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
    b[0][1] = pair(B, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  } else {
    for (int e = lane; e < 256; e += 32) {
      As[e] = static_cast<uint16_t>(sc2::bits(A[e]));
      if (e < 16 * n) Bs[e] = static_cast<uint16_t>(sc2::bits(B[e]));
    }
    __syncwarp();
    sc2::ldmatrix_x4(a, &As[(lane % 16) * 16 + (lane / 16) * 8]);
    uint32_t r[4];
    switch (mode) {
      case 1:  // B (k, n) 16x8, rows of 16 bytes: matrices k 0-7 and k 8-15, transposed
        sc2::ldmatrix_x2_trans(b[0], &Bs[(lane % 16) * 8]);
        break;
      case 2:  // B stored (n, k) 8x16: matrices k 0-7 and k 8-15 of the n rows
        sc2::ldmatrix_x2(b[0], &Bs[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
        break;
      case 3:  // B (k, n) 16x16: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        sc2::ldmatrix_x4_trans(r, &Bs[(lane % 16) * 16 + (lane / 16) * 8]);
        b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
        break;
      default:  // 4: B stored (n, k) 16x16: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), ...
        sc2::ldmatrix_x4(r, &Bs[(lane % 8 + (lane / 16) * 8) * 16 + ((lane / 8) % 2) * 8]);
        b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
        break;
    }
  }
  for (int tile = 0; tile < n / 8; ++tile) {
    const int c0 = tile * 8 + 2 * t;
    float d[4] = {C[g * n + c0], C[g * n + c0 + 1], C[(g + 8) * n + c0], C[(g + 8) * n + c0 + 1]};
    sc2::mma_16816<T>(d, a, b[tile]);
    D[g * n + c0] = d[0];
    D[g * n + c0 + 1] = d[1];
    D[(g + 8) * n + c0] = d[2];
    D[(g + 8) * n + c0 + 1] = d[3];
  }
}

// ---- shuffles -------------------------------------------------------------------------------------
__global__ void shuffle_kernel(const int* in, int* out) {
  const int tid = threadIdx.x, lane = tid % 32, N = blockDim.x;
  const int x = in[tid];
  int row = 0;
  out[row++ * N + tid] = __shfl_sync(FULL, x, (lane * 7 + 3) % 32);
  out[row++ * N + tid] = __shfl_sync(FULL, x, lane + 5, 8);
  out[row++ * N + tid] = __shfl_sync(FULL, x, 31 - lane, 16);
  out[row++ * N + tid] = __shfl_up_sync(FULL, x, 3);
  out[row++ * N + tid] = __shfl_up_sync(FULL, x, 3, 16);
  out[row++ * N + tid] = __shfl_down_sync(FULL, x, 5);
  out[row++ * N + tid] = __shfl_down_sync(FULL, x, 5, 8);
  out[row++ * N + tid] = __shfl_xor_sync(FULL, x, 13);
  out[row++ * N + tid] = __shfl_xor_sync(FULL, x, 4, 4);
  out[row++ * N + tid] = static_cast<int>(sc2::warp_sum(static_cast<float>(x)));
  out[row++ * N + tid] = static_cast<int>(sc2::warp_max(static_cast<float>(x)));
  out[row++ * N + tid] = static_cast<int>(sc2::quad_sum(static_cast<float>(x)));
  out[row++ * N + tid] = static_cast<int>(sc2::quad_max(static_cast<float>(x)));
  const long long wide = (static_cast<long long>(x) << 33) + 1;  // 64-bit values shuffle whole
  out[row++ * N + tid] = static_cast<int>(__shfl_xor_sync(FULL, wide, 1) >> 33);
}

// ---- barriers --------------------------------------------------------------------------------------
__global__ void barrier_kernel(const float* in, float* out, bool with_barrier, bool dynamic) {
  __shared__ float st[128];
  SC2_DYNAMIC_SMEM(dyn);
  float* s = dynamic ? reinterpret_cast<float*>(dyn) : st;
  const int t = threadIdx.x, base = blockIdx.x * 128;
  s[t] = in[base + t];
  if (with_barrier) __syncthreads();
  out[base + t] = s[(t + 64) % 128];
}

// ---- faulty kernels --------------------------------------------------------------------------------
__global__ void fault_kernel(int kind, float* sink) {
  __shared__ __align__(16) uint16_t tile[8 * 16];
  SC2_DYNAMIC_SMEM(dyn);
  const int tid = threadIdx.x, lane = tid % 32;
  float v = static_cast<float>(tid);
  switch (kind) {
    case 0:  // correct
      v = sc2::warp_sum(v);
      __syncthreads();
      break;
    case 1:  // barrier in divergent code
      if (tid < 32) __syncthreads();
      break;
    case 2:  // shuffle in divergent code
      if (lane < 16) v = __shfl_xor_sync(FULL, v, 1);
      break;
    case 3:  // half the warp at a shuffle, half at a barrier
      if (lane < 16) v = __shfl_xor_sync(FULL, v, 1);
      else __syncthreads();
      break;
    case 4:  // partial mask
      v = __shfl_xor_sync(0x0000ffffu, v, 1);
      break;
    case 5:  // lanes at different collectives
      if (lane < 16) v = __shfl_xor_sync(FULL, v, 1);
      else __syncwarp();
      break;
    case 6: {  // misaligned ldmatrix row address
      uint32_t r[4];
      sc2::ldmatrix_x4(r, reinterpret_cast<const unsigned char*>(&tile[(lane % 8) * 16]) + 2);
      v = static_cast<float>(r[0]);
      break;
    }
    case 7: {  // ldmatrix from global memory
      uint32_t r[2];
      sc2::ldmatrix_x2(r, sink + 64 + 4 * (lane % 16));
      v = static_cast<float>(r[0]);
      break;
    }
    case 8:  // one float past the end of 256 bytes of dynamic shared memory
      if (tid == 5) reinterpret_cast<float*>(dyn)[64 + tid] = v;
      break;
    default: break;
  }
  sink[tid] = v;
}

std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace

namespace sc2_emu {

std::string mma_test(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype, int mode) {
  if (mode < 0 || mode > 4) return "mma_test: mode 0..4";
  constexpr size_t kMmaSmem = 2 * 16 * 16 * sizeof(uint16_t);
  const float* C = reinterpret_cast<const float*>(c);
  float* D = reinterpret_cast<float*>(d);
  if (dtype == 0)
    SC2_LAUNCH(1, 32, kMmaSmem, nullptr, mma_kernel<__half>)(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b), C, D, mode);
  else
    SC2_LAUNCH(1, 32, kMmaSmem, nullptr, mma_kernel<__nv_bfloat16>)(reinterpret_cast<const __nv_bfloat16*>(a),
                                                       reinterpret_cast<const __nv_bfloat16*>(b), C, D, mode);
  return launch_error("mma_test");
}

std::string shuffle_test(uintptr_t in, uintptr_t out) {
  SC2_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(reinterpret_cast<const int*>(in), reinterpret_cast<int*>(out));
  return launch_error("shuffle_test");
}

std::string barrier_test(uintptr_t in, uintptr_t out, bool with_barrier, bool dynamic_smem) {
  SC2_LAUNCH(4, 128, dynamic_smem ? 128 * sizeof(float) : 0, nullptr, barrier_kernel)(
      reinterpret_cast<const float*>(in), reinterpret_cast<float*>(out), with_barrier, dynamic_smem);
  return launch_error("barrier_test");
}

std::string fault_test(const std::string& name) {
  static const char* const kinds[] = {"ok", "divergent_barrier", "divergent_shuffle", "shuffle_vs_barrier",
                                      "partial_mask", "mixed_collectives", "ldmatrix_misaligned",
                                      "ldmatrix_global"};
  cudaGetLastError();  // errors of earlier calls are not this case's
  float sink[256] = {};
  for (int k = 0; k < 8; ++k)
    if (name == kinds[k]) {
      SC2_LAUNCH(1, 64, 0, nullptr, fault_kernel)(k, sink);
      return launch_error(kinds[k]);
    }
  if (name == "smem_overflow") {
    SC2_LAUNCH(1, 64, 256, nullptr, fault_kernel)(8, sink);
    return launch_error("smem_overflow");
  }
  if (name == "smem_over_default") {  // 64 KB without cudaFuncSetAttribute (limit 48 KB)
    SC2_LAUNCH(1, 64, 64 * 1024, nullptr, barrier_kernel)(sink, sink, true, true);
    return launch_error("smem_over_default");
  }
  if (name == "smem_attribute_too_big") {
    cudaError_t err = cudaFuncSetAttribute(barrier_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024);
    return err == cudaSuccess ? "" : std::string("smem_attribute_too_big: ") + cudaGetErrorString(err);
  }
  if (name == "block_too_big") {
    SC2_LAUNCH(1, 1056, 0, nullptr, fault_kernel)(0, sink);
    return launch_error("block_too_big");
  }
  return "fault_test: unknown case " + name;
}

void convert_test(uintptr_t in, int64_t n, uintptr_t half_bits, uintptr_t bf16_bits, uintptr_t half_back,
                  uintptr_t bf16_back) {
  const float* x = reinterpret_cast<const float*>(in);
  for (int64_t i = 0; i < n; ++i) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    reinterpret_cast<uint16_t*>(half_bits)[i] = __half_as_ushort(h);
    reinterpret_cast<uint16_t*>(bf16_bits)[i] = __bfloat16_as_ushort(b);
    reinterpret_cast<float*>(half_back)[i] = __half2float(h);
    reinterpret_cast<float*>(bf16_back)[i] = __bfloat162float(b);
  }
}

}  // namespace sc2_emu
