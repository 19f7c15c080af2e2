// CUDA on the CPU, for tests: the subset of the CUDA language and runtime our kernels use, so
// the very same kernel source compiles with g++ (-x c++ -DSC2_CUDA_EMULATION) and runs.
//
// Execution model (emu/cuda_emu_runtime.cpp): every CUDA thread is a fiber on one OS thread;
// blocks run one after another; a thread runs until it reaches a sync point (__syncthreads, a
// warp collective: shuffles, __syncwarp, mma, ldmatrix) and then yields. Warps run depth-first
// (one warp goes as far as it can before the next starts; the order alternates between blocks),
// so a missing __syncthreads shows up as a read of data not yet written (dynamic and static
// shared memory are filled with 0xFF, a NaN in every float type, at each block start).
// Divergent barriers and collectives, partial-warp masks and threads exiting while others wait
// at a barrier end the launch with an error (cudaGetLastError / cudaGetErrorString).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- language -----------------------------------------------------------------------------------
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static array per declaration is the block's shared array. The
// section lets the runtime poison all of them at each block start (__start_/__stop_ symbols).
// Limitation: GCC ignores section attributes on static locals of function templates, so
// __shared__ arrays inside templates are neither poisoned nor accepted by ldmatrix as shared
// memory; our kernels use dynamic shared memory (SC2_DYNAMIC_SMEM), which has neither problem.
#define __shared__ __attribute__((section("sc2emu_shared"))) static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int warpSize = 32;

// Vector types with CUDA's sizes and alignments (a 16-byte uint4 load must be 16-byte aligned).
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- 16-bit float storage types (round to nearest even, as the _rn intrinsics) ---------------------
struct __half {
  unsigned short x_;
};
struct __nv_bfloat16 {
  unsigned short x_;
};

namespace emu {
float half_bits_to_float(uint32_t h);
uint32_t float_to_half_bits(float f);
float bf16_bits_to_float(uint32_t h);
uint32_t float_to_bf16_bits(float f);
}  // namespace emu

inline float __half2float(__half h) { return ::emu::half_bits_to_float(h.x_); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::emu::bf16_bits_to_float(h.x_); }
inline __half __float2half_rn(float f) { return __half{static_cast<unsigned short>(::emu::float_to_half_bits(f))}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{static_cast<unsigned short>(::emu::float_to_bf16_bits(f))};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.x_; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x_; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }

// ---- math ---------------------------------------------------------------------------------------
// exp2f, log2f, fmaxf, INFINITY, ...: <cmath> (glibc declares them globally, as CUDA does).
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }

// ---- runtime API --------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError cudaError_t;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

namespace emu {

constexpr size_t kDefaultDynamicSmem = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmem = 227 * 1024;      // sm_90 opt-in limit per block
constexpr unsigned kMaxThreadsPerBlock = 1024;

cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t get_last_error(bool clear);
const char* error_string(cudaError_t err);

using KernelBody = void (*)(void* ctx);
// Runs a whole grid (blocks in order, each block's threads as fibers). Returns the launch
// error, also kept for cudaGetLastError.
cudaError_t launch(const void* func, dim3 grid, dim3 block, size_t smem_bytes, KernelBody body, void* ctx);

// SC2_LAUNCH(...)(args...): the <<<grid, block, smem, stream>>>(args...) of the emulator.
template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    using Args = std::tuple<std::decay_t<P>...>;
    struct Ctx {
      void (*kernel)(P...);
      Args args;
    };
    Ctx ctx{kernel, Args(std::forward<A>(args)...)};
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [](void* c) {
             Ctx* x = static_cast<Ctx*>(c);
             std::apply(x->kernel, x->args);  // each thread gets its own copy of the parameters
           },
           &ctx);
  }
};
// Launches run synchronously on the calling thread, so the stream only orders nothing.
template <class... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/) {
  return Launcher<P...>{kernel, grid, block, smem};
}

// ---- what a running thread sees -------------------------------------------------------------
struct ThreadState;
namespace detail {
extern const uint3* g_thread_idx;  // the running fiber's
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
extern unsigned char* g_dynamic_smem;
}  // namespace detail

inline unsigned char* dynamic_smem() { return detail::g_dynamic_smem; }

// Warp collectives: the lane deposits its inputs in its slot, waits until all 32 lanes of its
// warp arrived at the same collective, and reads its outputs from the slot.
enum CollectiveOp : int { kShfl = 1, kSyncWarp, kMma, kLdmatrix };
enum ShflMode : int { kShflIdx = 0, kShflUp, kShflDown, kShflXor };
struct LaneSlot {
  int op = 0;
  int mode = 0;       // shfl mode; mma dtype (0 f16, 1 bf16); ldmatrix matrix count
  int arg = 0;        // shfl lane / delta / mask; ldmatrix: transposed
  int width = 32;     // shfl width
  unsigned mask = 0;  // member mask
  const void* addr = nullptr;
  uint64_t value = 0;
  uint32_t in[10] = {};
  uint32_t out[4] = {};
  uint64_t out_value = 0;
};
LaneSlot& lane_slot();
void warp_collective();          // the slot is filled; returns when the warp's results are in it
void syncthreads();
[[noreturn]] void fail(const char* what);  // ends the launch with this message

template <class T>
inline T shfl(int mode, unsigned mask, T var, int b, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  LaneSlot& s = lane_slot();
  s.op = kShfl;
  s.mode = mode;
  s.mask = mask;
  s.arg = b;
  s.width = width;
  s.value = 0;
  std::memcpy(&s.value, &var, sizeof(T));
  warp_collective();
  T out;
  std::memcpy(&out, &lane_slot().out_value, sizeof(T));
  return out;
}

// m16n8k16 row.col, fp32 accumulate; T is __half or __nv_bfloat16 (fragments as in the PTX ISA).
template <class T>
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16/bf16 mma");
  LaneSlot& s = lane_slot();
  s.op = kMma;
  s.mode = std::is_same<T, __nv_bfloat16>::value ? 1 : 0;
  s.mask = 0xffffffffu;
  for (int i = 0; i < 4; ++i) s.in[i] = a[i];
  for (int i = 0; i < 2; ++i) s.in[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) std::memcpy(&s.in[6 + i], &d[i], 4);
  warp_collective();
  const LaneSlot& r = lane_slot();
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &r.out[i], 4);
}

// ldmatrix.sync.aligned.m8n8.x{n}[.trans].shared.b16.
inline void ldmatrix(uint32_t* r, int n_matrices, const void* row_addr, bool trans) {
  LaneSlot& s = lane_slot();
  s.op = kLdmatrix;
  s.mode = n_matrices;
  s.arg = trans ? 1 : 0;
  s.mask = 0xffffffffu;
  s.addr = row_addr;
  warp_collective();
  const LaneSlot& o = lane_slot();
  for (int i = 0; i < n_matrices; ++i) r[i] = o.out[i];
}

}  // namespace emu

#define threadIdx (*::emu::detail::g_thread_idx)
#define blockIdx (::emu::detail::g_block_idx)
#define blockDim (::emu::detail::g_block_dim)
#define gridDim (::emu::detail::g_grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::emu::LaneSlot& s = ::emu::lane_slot();
  s.op = ::emu::kSyncWarp;
  s.mask = mask;
  ::emu::warp_collective();
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::emu::shfl(::emu::kShflIdx, mask, var, src_lane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::shfl(::emu::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::shfl(::emu::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::emu::shfl(::emu::kShflXor, mask, var, lane_mask, width);
}

// Fibers never run concurrently and switch only at sync points, so plain read-modify-writes are
// atomic here.
template <class T>
inline T atomicAdd(T* address, T val) {
  static_assert(std::is_arithmetic<T>::value, "atomicAdd on a number");
  const T old = *address;
  *address = old + val;
  return old;
}
template <class T>
inline T atomicMax(T* address, T val) {
  const T old = *address;
  *address = old < val ? val : old;
  return old;
}
template <class T>
inline T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return ::emu::set_func_attribute(reinterpret_cast<const void*>(func), attr, value);
}
inline cudaError_t cudaGetLastError() { return ::emu::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::emu::get_last_error(false); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::emu::error_string(err); }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous
