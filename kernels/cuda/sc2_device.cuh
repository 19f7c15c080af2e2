// Device helpers shared by the attention kernels: conversions, warp reductions, tensor-core
// instructions. Every kernel goes through these names, so the same kernel source compiles for a
// GPU (nvcc, inline PTX below) and for the CPU emulator used by the tests
// (SC2_CUDA_EMULATION, emu/cuda_emu.h), which implements each of them with the register layouts
// the PTX ISA documents.
#pragma once

#include <cstdint>

#ifdef SC2_CUDA_EMULATION
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

// Dynamic shared memory of a kernel, as bytes: `SC2_DYNAMIC_SMEM(smem);`
#ifdef SC2_CUDA_EMULATION
#define SC2_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
// Kernel launch: SC2_LAUNCH(grid, block, smem_bytes, stream, kernel<T, D>)(args...)
#define SC2_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(__VA_ARGS__, grid, block, smem, stream)
#else
#define SC2_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SC2_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace sc2 {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two values of T in one 32-bit register, `lo` in the low 16 bits (the lower column / k index,
// as mma operands expect).
__device__ __forceinline__ uint32_t bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits(from_float<T>(lo)) | (bits(from_float<T>(hi)) << 16);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
// Over the 4 lanes of a quad (lanes 4g..4g+3): the lanes that share a row of an mma C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// d += a * b on tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32.
// Warp-collective. With g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"):
//   a[0]: A[g][2t..2t+1]    a[1]: A[g+8][2t..2t+1]    a[2]: A[g][2t+8..]    a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]    b[1]: B[2t+8..2t+9][g]
//   d[0..1]: D[g][2t..2t+1] d[2..3]: D[g+8][2t..2t+1]
template <typename T> __device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of 8x8
// matrix i (16-byte rows in shared memory); r[i] gets, per lane, matrix i's elements
// [lane/4][2(lane%4)..+1] (without .trans) or [2(lane%4)..+1][lane/4] (with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_addr);
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row_addr);
// As above for two matrices: lanes 0..15 give the addresses (the others' are ignored).
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row_addr);
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row_addr);

#ifdef SC2_CUDA_EMULATION
template <typename T> __device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  ::emu::mma_16816<T>(d, a, b);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) { ::emu::ldmatrix(r, 4, p, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) { ::emu::ldmatrix(r, 4, p, true); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* p) { ::emu::ldmatrix(r, 2, p, false); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* p) { ::emu::ldmatrix(r, 2, p, true); }
#else
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
#endif

}  // namespace sc2
