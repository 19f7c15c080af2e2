// Interface between the pybind11 bindings (host C++) and the CUDA kernels (attn_cuda_kernel.cu).
#pragma once

#include <cstdint>
#include <string>

// S: key positions; Sq <= S: query rows, the last Sq positions (query row t is position
// t + S - Sq). Everything indexed by position (lo, doc, k, v, dk, dv) has S rows; q, o, dout, dq,
// dq32, lse and delta have Sq.
struct CudaAttnArgs {
  const void* q = nullptr;      // (B, Sq, H, D) fp16/bf16, contiguous
  const void* k = nullptr;      // (B, S, KV, D)
  const void* v = nullptr;      // (B, S, KV, D)
  void* o = nullptr;            // forward output (B, S, H, D)
  const void* dout = nullptr;   // backward: gradient of o
  float* lse = nullptr;         // (B, H, S) fp32, base-2 log-sum-exp of the scaled scores
  const float* delta = nullptr; // backward: (B, H, S) fp32, rowsum(dout * o)
  const int32_t* lo = nullptr;  // (B, S): first key each query may see (window and document run);
                                // nondecreasing along S (the tensor-core backward relies on it)
  const int64_t* doc = nullptr; // (B, S) document ids, or null
  const uint8_t* by_id = nullptr;  // (B): 1 where ids must be compared element by element
  void* dq = nullptr;           // (B, S, H, D) like q
  float* dk = nullptr;          // (B, S, KV, D) fp32, zeroed by the caller, accumulated atomically
  float* dv = nullptr;
  float* dq32 = nullptr;        // backward, tensor cores: (B, S, H, D) fp32 zeroed scratch for dQ
  int head_splits = 0;          // backward, tensor cores: blocks per (key tile, kv head); 0: auto
  int fwd_rows_per_warp = 0;    // forward, tensor cores: query rows per warp, 16 or 32; 0: 16
  int bwd_warps = 0;            // backward, tensor cores: warps (16 keys each) per block, 4 or 8; 0: 4
  int64_t B = 0, S = 0, Sq = 0, H = 0, KV = 0, D = 0;
  float scale = 1.0f;
  int dtype = 0;  // 0: float16, 1: bfloat16
  int kernel = 0; // 0: tensor cores (mma.sync, attn_cuda_mma.cuh), 1: SIMT (attn_cuda_kernel.cu)
  uintptr_t stream = 0;
};

// Each returns an empty string on success, else what went wrong.
std::string sc2_cuda_forward(const CudaAttnArgs& a);
std::string sc2_cuda_backward(const CudaAttnArgs& a);
std::string sc2_cuda_device_count(int* count);
