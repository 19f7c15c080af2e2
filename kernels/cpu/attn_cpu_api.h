// The interface between the pybind11 bindings and the instruction-set builds of the kernel.
#pragma once

#include <cstdint>

struct AttnArgs {
  // Raw data pointers (tensors made contiguous by the Python side); doc may be null.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;     // forward: written; backward: read
  const void* dout = nullptr;  // backward only
  float* lse = nullptr;        // (B, H, Sq) fp32, base-2 log-sum-exp of the scaled scores
  const int64_t* doc = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // S: key length; Sq <= S: query length. Query row t sits at key position t + (S - Sq) (the
  // queries are the last Sq positions; doc covers the S key positions).
  int64_t B = 0, S = 0, Sq = 0, H = 0, KV = 0, D = 0;
  int64_t window = 0;  // <= 0: plain causal
  float scale = 1.0f;
  int dtype = 0;  // 0: float32, 1: bfloat16
  int nthreads = 1;
};

#define SC2_DECLARE_VARIANT(ns)             \
  namespace ns {                            \
  void attn_forward(const AttnArgs& a);     \
  void attn_backward(const AttnArgs& a);    \
  }

SC2_DECLARE_VARIANT(sc2_cpu_baseline)
#if defined(__x86_64__)
SC2_DECLARE_VARIANT(sc2_cpu_avx2)
SC2_DECLARE_VARIANT(sc2_cpu_avx512)
#endif
