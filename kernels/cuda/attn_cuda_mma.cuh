// Sliding-window GQA attention on tensor cores (mma.sync m16n8k16, fp32 accumulation), in the
// style of FlashAttention-2. Same contract as the SIMT kernels in attn_cuda_kernel.cu: q
// (B,S,H,D), k/v (B,S,KV,D) fp16/bf16; query i sees key j iff lo[b,i] <= j <= i and, where
// by_id[b], doc[b,i] == doc[b,j]; lse (B,H,S) is the base-2 log-sum-exp of the scores times
// scale*log2(e), so either family's forward feeds either family's backward. Queries may be
// fewer than keys (Sq <= S, the last positions): q, o, dout, dq32, lse and delta are indexed by
// query row t = position - (S - Sq); masks, lo, doc and the key tiles by position.
//
// Forward: one block per (64 MT query rows, head, batch), 4 warps of 16 MT rows (MT = 1, the
// default, or 2: rows_per_warp 16 or 32). Key tiles of 64 rows (32 for MT = 2 with D = 128): K and
// V, rows padded to D+8 elements so ldmatrix is free of bank conflicts, from the tile holding
// lo[first query] to the tile of the last query. No cp.async: each tile's K and V are loaded
// into registers one compute phase before they are stored to shared memory (V(j) during the
// scores of tile j, K(j+1) during its P V product), two barriers per tile. A warp skips tiles
// none of its rows can see and tests elements only in tiles that touch the window edge, the
// diagonal or (unsorted ids) documents. Online softmax in registers; P goes from the score
// accumulators straight into A fragments (no shared memory). MT = 1 keeps Q's fragments in
// registers; MT = 2 re-reads them from shared memory but feeds every K/V fragment to twice the
// mma instructions.
//
// Backward: one block per (16 NW keys, kv head, batch, part of the group's query heads), NW = 4
// (default) or 8 warps of 16 keys; it loops over its query heads and over the 32-row query tiles
// that can see its keys: queries from its first key to the first query whose lo is past its
// last key (lo is nondecreasing along the sequence: key_bounds builds it from the window and,
// for sorted ids, the document starts; for unsorted ids lo is only the window bound and
// documents are tested element by element). Each step's Q, dO and row inputs are fetched during
// the previous step (double-buffered, one barrier per step). dK and dV stay in registers; they are
// stored once when a block has the whole group, else added atomically (GQA groups are split over
// blocks when the grid would otherwise have fewer than ~1024 blocks). dQ = dS K goes through
// shared memory and is added with coalesced fp32 atomics into a zeroed (B,S,H,D) buffer that a
// second kernel scales and casts into dq.
//
// Only the helpers of sc2_device.cuh and plain CUDA builtins are used, so the CPU emulator
// (SC2_CUDA_EMULATION) runs this exact source in the tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "attn_cuda_api.h"
#include "sc2_device.cuh"

namespace sc2_mma {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBwdRows = 32;  // query rows per backward step
constexpr float kLog2e = 1.4426950408889634f;

constexpr int64_t kBwdTargetBlocks = 1024;  // backward grids split query heads to reach this

struct Params {
  CudaAttnArgs a;
  float scale2;      // softmax scale * log2(e): scores in base 2
  int head_splits;   // backward: blocks per (key tile, kv head), each taking heads_per_split
  int heads_per_split;
};

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
__device__ __forceinline__ int min32(int x, int y) { return x < y ? x : y; }

// A ROWS x D tile moved global -> registers -> shared memory, 16 bytes per thread and step, so
// the global loads can be issued a whole compute phase before the data is stored (no cp.async).
template <int D, int ROWS, int NT = kThreads>
struct TileRegs {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kSteps = ROWS * kChunks / NT;
  static_assert((ROWS * kChunks) % NT == 0, "tile must split evenly over the block");
  uint4 r[kSteps];

  // Rows >= valid read as zeros; global rows are gstride elements apart.
  template <typename T>
  __device__ __forceinline__ void fetch(const T* src, int64_t gstride, int valid, int tid) {
#pragma unroll
    for (int it = 0; it < kSteps; ++it) {
      const int e = tid + it * NT;
      const int row = e / kChunks, c = e % kChunks;
      r[it] = uint4{0u, 0u, 0u, 0u};
      if (row < valid) r[it] = *reinterpret_cast<const uint4*>(src + row * gstride + c * 8);
    }
  }
  template <typename T, int LD>
  __device__ __forceinline__ void store(T* dst, int tid) const {
#pragma unroll
    for (int it = 0; it < kSteps; ++it) {
      const int e = tid + it * NT;
      *reinterpret_cast<uint4*>(dst + (e / kChunks) * LD + (e % kChunks) * 8) = r[it];
    }
  }
};

template <typename T, int D, int ROWS, int LD, int NT = kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t gstride, int valid, int tid) {
  TileRegs<D, ROWS, NT> t;
  t.fetch(src, gstride, valid, tid);
  t.template store<T, LD>(dst, tid);
}

// Lane addresses for ldmatrix_x4 (see sc2_device.cuh for the fragment layouts). `base` points at
// the 16x16 block's top-left element in shared memory, rows LD elements apart.
//  A operand (16 rows x 16 k), rows in memory: r[0..3] = a[0..3].
template <typename T>
__device__ __forceinline__ const T* a_addr(const T* base, int ld, int lane) {
  return base + (lane & 15) * ld + (lane >> 4) * 8;
}
//  B operand of two n-tiles from memory holding B^T (rows = n, columns = k), no transpose:
//  r[0..1] = b of n-tile 0, r[2..3] = b of n-tile 1.
template <typename T>
__device__ __forceinline__ const T* bt_addr(const T* base, int ld, int lane) {
  return base + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
}
//  B operand of two n-tiles from memory holding B (rows = k, columns = n), with .trans.
template <typename T>
__device__ __forceinline__ const T* b_addr(const T* base, int ld, int lane) {
  return base + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ld + (lane >> 4) * 8;
}
//  A operand from memory holding A^T (rows = k, columns = m), with .trans.
template <typename T>
__device__ __forceinline__ const T* at_addr(const T* base, int ld, int lane) {
  return base + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
}

// A fragment (16 x 16) from two C fragments (16 x 8 each) holding columns 0..7 and 8..15.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = sc2::pack2<T>(c0[0], c0[1]);
  a[1] = sc2::pack2<T>(c0[2], c0[3]);
  a[2] = sc2::pack2<T>(c1[0], c1[1]);
  a[3] = sc2::pack2<T>(c1[2], c1[3]);
}

// Forward shapes: MT m-tiles (16 rows each) per warp. MT = 1: Q fragments stay in registers,
// 64-key tiles. MT = 2: every K/V fragment read from shared memory feeds twice the mma
// instructions (half the shared-memory traffic per mma), Q is re-read from its own buffer, and
// D = 128 takes 32-key tiles to stay within 255 registers.
template <typename T, int D, int MT>
struct FwdShape {
  static constexpr int kRows = 16 * MT * kWarps;           // query rows per block
  static constexpr int kKeys = (MT == 2 && D == 128) ? 32 : 64;  // keys per tile
  static constexpr bool kQInRegs = MT == 1;
  static constexpr int LD = D + 8;
  static_assert(kQInRegs ? kRows <= kKeys : true, "Q and O tiles are staged in the K/V buffers");
  static constexpr int kQRows = kQInRegs ? 0 : kRows;      // rows of the separate Q/O buffer
  static constexpr size_t kBytes = sizeof(T) * (2 * kKeys + kQRows) * LD + sizeof(int64_t) * kKeys;
};

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Params p) {
  using F = FwdShape<T, D, MT>;
  constexpr int LD = F::LD, BK = F::kKeys, BQ = F::kRows;
  constexpr int KT = D / 16;   // k-steps over the head dim
  constexpr int NS = BK / 8;   // score n-tiles per key tile
  constexpr int NO = D / 8;    // output n-tiles
  SC2_DYNAMIC_SMEM(smem);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + BK * LD;
  int64_t* kdoc = reinterpret_cast<int64_t*>(Vs + BK * LD);
  // Q and, at the end, O: their own buffer, or (MT = 1) staged in V (Q) and K (O).
  T* Qs = F::kQInRegs ? Vs : reinterpret_cast<T*>(kdoc + BK);
  T* Os = F::kQInRegs ? Ks : Qs;

  const CudaAttnArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t S = a.S, H = a.H, KV = a.KV;
  const int64_t b = blockIdx.z, h = blockIdx.y, t0 = static_cast<int64_t>(blockIdx.x) * BQ;
  const int64_t Sq = a.Sq, i0 = t0 + (S - Sq);  // first query row, its position
  const int64_t kvh = h / (H / KV);
  const int nq = static_cast<int>(min64(Sq - t0, BQ));
  const bool by_id = a.by_id != nullptr && a.by_id[b] != 0;
  const int32_t* lo = a.lo + b * S;
  const int64_t* doc = a.doc == nullptr ? nullptr : a.doc + b * S;

  load_tile<T, D, BQ, LD>(Qs, static_cast<const T*>(a.q) + ((b * Sq + t0) * H + h) * D, H * D, nq, tid);
  __syncthreads();
  const int r0 = warp * 16 * MT;
  uint32_t qf[F::kQInRegs ? KT : 1][4];
  if constexpr (F::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) sc2::ldmatrix_x4(qf[kk], a_addr(Qs + r0 * LD + kk * 16, LD, lane));
  }

  // This thread's rows: g and g + 8 of each of the warp's m-tiles (clamped for look-ups). Row
  // and key indices are 32-bit: S <= INT32_MAX (the bindings check it).
  const int wfirst = static_cast<int>(i0) + r0, wlast = static_cast<int>(min64(wfirst + 16 * MT - 1, S - 1));
  int row[MT][2];
  int32_t rlo[MT][2];
  int64_t rdoc[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[mt][r] = wfirst + 16 * mt + g + 8 * r;
      rlo[mt][r] = lo[min64(row[mt][r], S - 1)];
      rdoc[mt][r] = by_id ? doc[min64(row[mt][r], S - 1)] : 0;
    }
  }
  const bool warp_live = wfirst < S;
  const int wlo_first = warp_live ? lo[wfirst] : 0, wlo_last = lo[wlast];

  float o[MT][NO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < NO; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  float m[MT][2], l[MT][2];  // l: this thread's partial sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;

  // Software pipeline, two barriers per tile: V(j) is fetched during the score phase of tile j
  // and K(j+1) during its P V phase; each is stored when the phase that last read its buffer is
  // over on every warp.
  const T* kbase = static_cast<const T*>(a.k) + (b * S * KV + kvh) * D;
  const T* vbase = static_cast<const T*>(a.v) + (b * S * KV + kvh) * D;
  const int kbeg = (lo[i0] / BK) * BK, kend = static_cast<int>(i0) + nq;
  TileRegs<D, BK> kv;
  kv.fetch(kbase + static_cast<int64_t>(kbeg) * KV * D, KV * D, static_cast<int>(min64(S - kbeg, BK)), tid);
  if constexpr (F::kQInRegs) __syncthreads();  // every warp holds its Q fragments: V is free
  kv.template store<T, LD>(Ks, tid);
  __syncthreads();
  for (int j0 = kbeg; j0 < kend; j0 += BK) {
    const int nk = static_cast<int>(min64(S - j0, BK));
    kv.fetch(vbase + static_cast<int64_t>(j0) * KV * D, KV * D, nk, tid);
    // Warp-uniform: skip tiles none of this warp's rows can see; test elements only at edges.
    const bool live = warp_live && j0 <= wlast && j0 + BK - 1 >= wlo_first;
    const bool full = !by_id && j0 + BK - 1 <= wfirst && j0 >= wlo_last;

    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
    if (live) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (F::kQInRegs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) qa[mt][i] = qf[kk][i];
          } else {
            sc2::ldmatrix_x4(qa[mt], a_addr(Qs + (r0 + 16 * mt) * LD + kk * 16, LD, lane));
          }
        }
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
          uint32_t kb[4];
          sc2::ldmatrix_x4(kb, bt_addr(Ks + np * 16 * LD + kk * 16, LD, lane));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            sc2::mma_16816<T>(s[mt][2 * np], qa[mt], kb);
            sc2::mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb + 2);
          }
        }
      }
    }
    kv.template store<T, LD>(Vs, tid);  // the previous tile's P V is over (barrier below)
    if (by_id)
      for (int e = tid; e < BK; e += kThreads) kdoc[e] = e < nk ? doc[j0 + e] : 0;
    __syncthreads();  // V(j) and its ids stored; every warp is done reading K(j)
    const int jn = j0 + BK;
    if (jn < kend)
      kv.fetch(kbase + static_cast<int64_t>(jn) * KV * D, KV * D, static_cast<int>(min64(S - jn, BK)), tid);
    if (live) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
        // Visible: lo <= j <= row, as 32-bit offsets from the tile start (clamped to the tile).
        int vis_lo[2], vis_hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          vis_lo[r] = min32(rlo[mt][r] - j0, BK);
          vis_hi[r] = min32(row[mt][r] - j0, BK);
        }
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][n][e];  // raw q.k: scaled inside the exponent below (one FFMA)
            if (!full) {
              const int r = e >> 1;
              const int jj = n * 8 + 2 * t + (e & 1);
              const bool ok = jj <= vis_hi[r] && jj >= vis_lo[r] && (!by_id || kdoc[jj] == rdoc[mt][r]);
              if (!ok) x = -INFINITY;
            }
            s[mt][n][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
          }
        }
        float alpha[2], mref[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float mnew = fmaxf(m[mt][r], sc2::quad_max(mx[r]) * p.scale2);  // scale2 > 0
          mref[r] = mnew == -INFINITY ? 0.0f : mnew;  // a row with nothing visible yet stays at 0
          alpha[r] = exp2f(m[mt][r] - mref[r]);
          m[mt][r] = mnew;
          l[mt][r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][n][e] = exp2f(fmaf(s[mt][n][e], p.scale2, -mref[e >> 1]));
            l[mt][e >> 1] += s[mt][n][e];
          }
        }
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[mt][n][0] *= alpha[0];
          o[mt][n][1] *= alpha[0];
          o[mt][n][2] *= alpha[1];
          o[mt][n][3] *= alpha[1];
        }
      }
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) c_to_a<T>(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
          uint32_t vb[4];
          sc2::ldmatrix_x4_trans(vb, b_addr(Vs + kk * 16 * LD + np * 16, LD, lane));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            sc2::mma_16816<T>(o[mt][2 * np], pa[mt], vb);
            sc2::mma_16816<T>(o[mt][2 * np + 1], pa[mt], vb + 2);
          }
        }
      }
    }
    if (jn < kend) kv.template store<T, LD>(Ks, tid);  // every warp is past its scores of K(j)
    __syncthreads();  // K(j+1) stored; every warp is done reading V(j)
  }

  // Normalise; the O tile goes through shared memory so the global stores are 16-byte rows
  // (every warp is past its last reads of K and Q: the loop ends with a barrier).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] = sc2::quad_sum(l[mt][r]);
      inv[r] = l[mt][r] > 0.0f ? 1.0f / l[mt][r] : 0.0f;
    }
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      T* dst = Os + (r0 + 16 * mt + g) * LD + n * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dst) = sc2::pack2<T>(o[mt][n][0] * inv[0], o[mt][n][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(dst + 8 * LD) = sc2::pack2<T>(o[mt][n][2] * inv[1], o[mt][n][3] * inv[1]);
    }
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (row[mt][r] < S) a.lse[(b * H + h) * Sq + row[mt][r] - (S - Sq)] = m[mt][r] + log2f(l[mt][r]);
    }
  }
  __syncthreads();
  constexpr int kChunks = D / 8;
  T* out = static_cast<T*>(a.o) + ((b * Sq + t0) * H + h) * D;
#pragma unroll
  for (int it = 0; it < BQ * kChunks / kThreads; ++it) {
    const int e = tid + it * kThreads;
    const int r = e / kChunks, c = e % kChunks;
    if (r < nq)
      *reinterpret_cast<uint4*>(out + r * H * D + c * 8) =
          *reinterpret_cast<const uint4*>(Os + r * LD + c * 8);
  }
}

// Backward shapes: NW warps of 16 keys each (64 or 128 keys per block); more keys per block
// means fewer Q/dO loads and dQ atomics per mma, fewer blocks per SM.
template <typename T, int D, int NW>
struct BwdSmem {
  static constexpr int BK = 16 * NW;        // keys per block
  static constexpr int NT = 32 * NW;        // threads per block
  static constexpr int LD = D + 8;          // K, V, Q, dO rows
  static constexpr int LDS = kBwdRows + 8;  // dS^T rows (one per key)
  // K, V; then two buffers each of Q, dO and dS^T (steps alternate between them).
  static constexpr size_t kT = static_cast<size_t>(2 * BK * LD + 2 * (2 * kBwdRows * LD + BK * LDS));
  static constexpr size_t kRowBytes = kBwdRows * (sizeof(int64_t) + 2 * sizeof(float) + sizeof(int32_t));
  static constexpr int LDQ = D + 4;  // fp32 dQ staging rows (2 blocks of D = 128 fit an H100 SM)
  static constexpr size_t kBytes = sizeof(T) * kT + 2 * kRowBytes + 2 * sizeof(float) * kBwdRows * LDQ;
  static_assert((sizeof(T) * kT) % 16 == 0, "the per-row arrays stay 16-byte aligned");
};

// Per-row inputs of one backward step (query rows i0 .. i0 + kBwdRows - 1), in shared memory.
struct BwdRows {
  int64_t* doc;
  float* lse;
  float* delta;
  int32_t* lo;
  __device__ __forceinline__ explicit BwdRows(unsigned char* base)
      : doc(reinterpret_cast<int64_t*>(base)), lse(reinterpret_cast<float*>(doc + kBwdRows)),
        delta(lse + kBwdRows), lo(reinterpret_cast<int32_t*>(delta + kBwdRows)) {}
};

// One step's row inputs held in registers between fetch and store (threads < kBwdRows).
struct RowRegs {
  int64_t doc = 0;
  float lse = INFINITY, delta = 0.0f;
  int32_t lo = 0;
};

template <typename T, int D, int NW>
__global__ void __launch_bounds__(32 * NW) bwd_kernel(const Params p) {
  using L = BwdSmem<T, D, NW>;
  constexpr int LD = L::LD, LDS = L::LDS, LDQ = L::LDQ, BK = L::BK, NT = L::NT;
  constexpr int KT = D / 16;
  constexpr int NQ = kBwdRows / 8;      // query n-tiles of S^T
  constexpr int ND = D / 8;             // head-dim n-tiles of dK, dV
  constexpr int DQC = D / (NW / 2);     // dQ: each warp's head-dim columns (2 warps per column)
  constexpr int NQD = DQC / 8;          // ... as n-tiles
  static_assert(NQD % 2 == 0, "dQ columns in pairs of n-tiles");
  SC2_DYNAMIC_SMEM(smem);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + BK * LD;
  // Buffer pairs, buffer `buf` at base + buf * size (indexing arrays of pointers would put them
  // in local memory).
  T* Q0 = Vs + BK * LD;               // 2 x kBwdRows * LD
  T* dO0 = Q0 + 2 * kBwdRows * LD;    // 2 x kBwdRows * LD
  T* dS0 = dO0 + 2 * kBwdRows * LD;   // 2 x BK * LDS (dS^T)
  unsigned char* rows0 = reinterpret_cast<unsigned char*>(dS0 + 2 * BK * LDS);  // 2 x kRowBytes
  float* dQ0 = reinterpret_cast<float*>(rows0 + 2 * L::kRowBytes);  // 2 x kBwdRows * LDQ, fp32

  const CudaAttnArgs& a = p.a;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t S = a.S, H = a.H, KV = a.KV, group = H / KV;
  const int64_t Sq = a.Sq, qpos = S - Sq;  // query row t is position t + qpos
  const int64_t b = blockIdx.z, kvh = blockIdx.y / p.head_splits, j0 = static_cast<int64_t>(blockIdx.x) * BK;
  // This block's query heads of the group: [hfirst, hfirst + nheads).
  const int64_t hfirst = (blockIdx.y % p.head_splits) * static_cast<int64_t>(p.heads_per_split);
  const int64_t nheads = min64(group - hfirst, p.heads_per_split);
  const int nk = static_cast<int>(min64(S - j0, BK));
  const bool by_id = a.by_id != nullptr && a.by_id[b] != 0;
  const int32_t* lo = a.lo + b * S;
  const int64_t* doc = a.doc == nullptr ? nullptr : a.doc + b * S;
  const T* qg = static_cast<const T*>(a.q);
  const T* dog = static_cast<const T*>(a.dout);

  const int64_t koff = ((b * S + j0) * KV + kvh) * D;
  load_tile<T, D, BK, LD, NT>(Ks, static_cast<const T*>(a.k) + koff, KV * D, nk, tid);
  load_tile<T, D, BK, LD, NT>(Vs, static_cast<const T*>(a.v) + koff, KV * D, nk, tid);

  // Queries that can see a key of this block: positions [ibeg, iend), ibeg = max(j0, first query
  // position), iend the first i with lo[i] > last key.
  const int64_t jlast = j0 + nk - 1;
  const int64_t ibeg = j0 > qpos ? j0 : qpos;
  int64_t lo_i = ibeg, hi_i = S;
  while (lo_i < hi_i) {
    const int64_t mid = (lo_i + hi_i) / 2;
    if (lo[mid] > jlast) hi_i = mid; else lo_i = mid + 1;
  }
  const int64_t iend = lo_i;
  // Steps: each of the block's query heads times the query tiles of [ibeg, iend).
  const int64_t tiles = (iend - ibeg + kBwdRows - 1) / kBwdRows, steps = nheads * tiles;

  // Step `st` as (head, first row); fetch its Q, dO and row inputs into registers.
  TileRegs<D, kBwdRows, NT> qr, dor;
  RowRegs rr;
  auto step_rows = [&](int64_t st, int64_t& h, int64_t& i0, int& nq) {
    h = kvh * group + hfirst + st / tiles;
    i0 = ibeg + (st % tiles) * kBwdRows;  // a position
    nq = static_cast<int>(min64(S - i0, kBwdRows));
  };
  auto fetch = [&](int64_t st) {
    int64_t h, i0;
    int nq;
    step_rows(st, h, i0, nq);
    const int64_t qoff = ((b * Sq + i0 - qpos) * H + h) * D;
    qr.fetch(qg + qoff, H * D, nq, tid);
    dor.fetch(dog + qoff, H * D, nq, tid);
    if (tid < kBwdRows) {
      const bool valid = tid < nq;
      const int64_t idx = (b * H + h) * Sq + i0 - qpos + tid;
      rr.lse = valid ? a.lse[idx] : INFINITY;  // padded rows: P = 0
      rr.delta = valid ? a.delta[idx] : 0.0f;
      rr.lo = lo[min64(i0 + tid, S - 1)];
      rr.doc = by_id && valid ? doc[i0 + tid] : 0;
    }
  };
  auto store = [&](int buf) {
    qr.template store<T, LD>(Q0 + buf * kBwdRows * LD, tid);
    dor.template store<T, LD>(dO0 + buf * kBwdRows * LD, tid);
    if (tid < kBwdRows) {
      const BwdRows rw(rows0 + buf * L::kRowBytes);
      rw.lse[tid] = rr.lse;
      rw.delta[tid] = rr.delta;
      rw.lo[tid] = rr.lo;
      rw.doc[tid] = rr.doc;
    }
  };

  // Adds step st's staged dQ tile into dq32, each warp a run of 32 consecutive floats of a row.
  auto flush_dq = [&](int64_t st) {
    int64_t h, i0;
    int nq;
    step_rows(st, h, i0, nq);
    static_assert(NT % D == 0, "whole rows per pass");
    constexpr int kRowStep = NT / D;
    const int r0 = tid / D, c = tid % D;
    const float* src = dQ0 + (st & 1) * kBwdRows * LDQ + r0 * LDQ + c;
    float* dst = a.dq32 + ((b * Sq + i0 - qpos + r0) * H + h) * D + c;
#pragma unroll 4
    for (int r = r0; r < nq; r += kRowStep) {
      atomicAdd(dst, *src);
      src += kRowStep * LDQ;
      dst += kRowStep * H * D;
    }
  };

  // This thread's two keys (rows g, g + 8 of the warp's 16 in S^T).
  const int k0 = warp * 16;
  const int64_t wkey = j0 + k0;
  const int64_t key[2] = {wkey + g, wkey + g + 8};
  int64_t kdoc[2] = {0, 0};
  if (by_id) {
    kdoc[0] = doc[min64(key[0], S - 1)];
    kdoc[1] = doc[min64(key[1], S - 1)];
  }
  const int key32[2] = {static_cast<int>(key[0]), static_cast<int>(key[1])};
  const bool warp_live = wkey < S;

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;

  const int qr0 = (warp & 1) * 16;         // dQ: this warp's query rows ...
  const int dc0 = (warp >> 1) * DQC;       // ... and head-dim columns
  if (steps > 0) {
    fetch(0);
    store(0);
  }
  __syncthreads();  // K, V and step 0 stored
  // One barrier per step: step st reads buffers st % 2 and stores step st + 1 into the others,
  // whose last readers (step st - 1, before that step's barrier) are done.
  for (int64_t st = 0; st < steps; ++st) {
    const int buf = static_cast<int>(st & 1);
    int64_t h, i0;
    int nq;
    step_rows(st, h, i0, nq);
    const T* Qs = Q0 + buf * kBwdRows * LD;
    const T* dOs = dO0 + buf * kBwdRows * LD;
    T* dSs = dS0 + buf * BK * LDS;
    const BwdRows rw(rows0 + buf * L::kRowBytes);
    const int64_t qlast = i0 + nq - 1;
    // Warp-uniform: some of this warp's keys may be visible to some of these queries.
    const bool live = warp_live && wkey <= qlast && rw.lo[0] <= wkey + 15;
    const bool full = !by_id && wkey + 15 <= i0 && wkey >= rw.lo[nq - 1];
    const int i032 = static_cast<int>(i0);
    float st_[NQ][4], dpt[NQ][4];  // S^T = K Q^T and dP^T = V dO^T, rows = keys
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st_[n][e] = dpt[n][e] = 0.0f;
    if (live) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t ka[4], va[4];
        sc2::ldmatrix_x4(ka, a_addr(Ks + k0 * LD + kk * 16, LD, lane));
        sc2::ldmatrix_x4(va, a_addr(Vs + k0 * LD + kk * 16, LD, lane));
#pragma unroll
        for (int np = 0; np < NQ / 2; ++np) {
          uint32_t qb[4], ob[4];
          sc2::ldmatrix_x4(qb, bt_addr(Qs + np * 16 * LD + kk * 16, LD, lane));
          sc2::ldmatrix_x4(ob, bt_addr(dOs + np * 16 * LD + kk * 16, LD, lane));
          sc2::mma_16816<T>(st_[2 * np], ka, qb);
          sc2::mma_16816<T>(st_[2 * np + 1], ka, qb + 2);
          sc2::mma_16816<T>(dpt[2 * np], va, ob);
          sc2::mma_16816<T>(dpt[2 * np + 1], va, ob + 2);
        }
      }
    }
    if (st + 1 < steps) fetch(st + 1);  // lands while this step computes
    if (live) {
      // P^T from the saved lse; dS^T = P^T * (dP^T - delta) (w.r.t. the scaled scores).
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = n * 8 + 2 * t + (e & 1);
          bool ok = true;
          if (!full) {  // 32-bit: S <= INT32_MAX (checked by the bindings)
            const int j = key32[e >> 1];
            ok = j - i032 <= qc && j >= rw.lo[qc] && (!by_id || rw.doc[qc] == kdoc[e >> 1]);
          }
          const float pr = ok ? exp2f(st_[n][e] * p.scale2 - rw.lse[qc]) : 0.0f;
          st_[n][e] = pr;
          dpt[n][e] = pr * (dpt[n][e] - rw.delta[qc]);
        }
      }
      // dV += P^T dO, dK += dS^T Q.
#pragma unroll
      for (int kk = 0; kk < kBwdRows / 16; ++kk) {
        uint32_t pa[4], da[4];
        c_to_a<T>(pa, st_[2 * kk], st_[2 * kk + 1]);
        c_to_a<T>(da, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < ND / 2; ++np) {
          uint32_t ob[4], qb[4];
          sc2::ldmatrix_x4_trans(ob, b_addr(dOs + kk * 16 * LD + np * 16, LD, lane));
          sc2::ldmatrix_x4_trans(qb, b_addr(Qs + kk * 16 * LD + np * 16, LD, lane));
          sc2::mma_16816<T>(dv[2 * np], pa, ob);
          sc2::mma_16816<T>(dv[2 * np + 1], pa, ob + 2);
          sc2::mma_16816<T>(dk[2 * np], da, qb);
          sc2::mma_16816<T>(dk[2 * np + 1], da, qb + 2);
        }
      }
    }
    // dS^T of this warp's keys (zeros when it saw nothing) for the block's dQ product.
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
      T* dst = dSs + (k0 + g) * LDS + n * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dst) = live ? sc2::pack2<T>(dpt[n][0], dpt[n][1]) : 0u;
      *reinterpret_cast<uint32_t*>(dst + 8 * LDS) = live ? sc2::pack2<T>(dpt[n][2], dpt[n][3]) : 0u;
    }
    if (st + 1 < steps) store(buf ^ 1);
    __syncthreads();  // dS^T complete; step st + 1 stored
    if (st > 0) flush_dq(st - 1);  // its staging buffer is complete (barrier above)
    // dQ (this warp: 16 query rows x DQC columns) = dS K over the block's keys, staged in
    // shared memory so that the atomics into dq32 cover whole 32-byte sectors (one per 8 lanes)
    // instead of scattered pairs of floats; added at the next step, after its barrier.
    float dq[NQD][4];
#pragma unroll
    for (int n = 0; n < NQD; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t sa[4];
      sc2::ldmatrix_x4_trans(sa, at_addr(dSs + kk * 16 * LDS + qr0, LDS, lane));
#pragma unroll
      for (int np = 0; np < NQD / 2; ++np) {
        uint32_t kb[4];
        sc2::ldmatrix_x4_trans(kb, b_addr(Ks + kk * 16 * LD + dc0 + np * 16, LD, lane));
        sc2::mma_16816<T>(dq[2 * np], sa, kb);
        sc2::mma_16816<T>(dq[2 * np + 1], sa, kb + 2);
      }
    }
    float* stage = dQ0 + buf * kBwdRows * LDQ;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float* dst = stage + (qr0 + g + 8 * r) * LDQ + dc0 + 2 * t;
#pragma unroll
      for (int n = 0; n < NQD; ++n) {
        dst[n * 8] = dq[n][2 * r];
        dst[n * 8 + 1] = dq[n][2 * r + 1];
      }
    }
  }
  __syncthreads();  // the last step's dQ is staged
  if (steps > 0) flush_dq(steps - 1);

  // dK (scaled) and dV: stored when this block has the whole group, else added.
  const bool owner = p.head_splits == 1;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= S) continue;
    const int64_t off = ((b * S + key[r]) * KV + kvh) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t o = off + n * 8 + e;
        const float gk = dk[n][2 * r + e] * a.scale, gv = dv[n][2 * r + e];
        if (owner) {
          a.dk[o] = gk;
          a.dv[o] = gv;
        } else {
          atomicAdd(a.dk + o, gk);
          atomicAdd(a.dv + o, gv);
        }
      }
    }
  }
}

// dq = scale * dq32, cast to T (pairs of elements; D is even).
template <typename T>
__global__ void __launch_bounds__(256) dq_cast_kernel(const float* src, T* dst, int64_t pairs, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < pairs; e += stride)
    reinterpret_cast<uint32_t*>(dst)[e] = sc2::pack2<T>(src[2 * e] * scale, src[2 * e + 1] * scale);
}

template <typename T, int D, int MT>
std::string launch_fwd(const Params& p) {
  using F = FwdShape<T, D, MT>;
  const CudaAttnArgs& a = p.a;
  const dim3 grid(static_cast<unsigned>((a.Sq + F::kRows - 1) / F::kRows), static_cast<unsigned>(a.H),
                  static_cast<unsigned>(a.B));
  cudaError_t err = cudaFuncSetAttribute(fwd_kernel<T, D, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(F::kBytes));
  if (err == cudaSuccess) {
    SC2_LAUNCH(grid, kThreads, F::kBytes, reinterpret_cast<cudaStream_t>(a.stream), fwd_kernel<T, D, MT>)(p);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) return "";
  return std::string("CUDA attention forward (tensor cores): ") + cudaGetErrorString(err);
}

template <typename T, int D, int NW>
std::string launch_bwd(Params p) {
  using L = BwdSmem<T, D, NW>;
  const CudaAttnArgs& a = p.a;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  // Few kv heads (GQA) leave too few (key tile, kv head) blocks to fill a GPU: split the group's
  // query heads over more blocks, which then add their dK/dV into the zeroed buffers.
  const int64_t group = a.H / a.KV, base = (a.S + L::BK - 1) / L::BK * a.KV * a.B;
  int64_t want = a.head_splits > 0 ? a.head_splits : (kBwdTargetBlocks + base - 1) / base;
  want = want < group ? want : group;
  const int64_t per = (group + want - 1) / want;
  p.heads_per_split = static_cast<int>(per);
  p.head_splits = static_cast<int>((group + per - 1) / per);
  const dim3 grid(static_cast<unsigned>((a.S + L::BK - 1) / L::BK),
                  static_cast<unsigned>(a.KV * p.head_splits), static_cast<unsigned>(a.B));
  cudaError_t err = cudaFuncSetAttribute(bwd_kernel<T, D, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(L::kBytes));
  // All of L1 as shared memory (100%): two 4-warp blocks of D = 128 need 2 x 113 KB on an SM.
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(bwd_kernel<T, D, NW>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (err == cudaSuccess) {
    SC2_LAUNCH(grid, L::NT, L::kBytes, stream, bwd_kernel<T, D, NW>)(p);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) {
    const int64_t pairs = a.B * a.Sq * a.H * D / 2;
    const int64_t blocks = (pairs + 255) / 256;
    const dim3 cgrid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096));
    SC2_LAUNCH(cgrid, 256, 0, stream, dq_cast_kernel<T>)(a.dq32, static_cast<T*>(a.dq), pairs, a.scale);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) return "";
  return std::string("CUDA attention backward (tensor cores): ") + cudaGetErrorString(err);
}

inline bool misaligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) != 0; }

template <typename T, int D>
std::string launch(const CudaAttnArgs& a, bool fwd) {
  const Params p{a, a.scale * kLog2e, 1, static_cast<int>(a.H / a.KV)};
  // Rows are moved 16 bytes at a time (D * sizeof(T) is a multiple of 16, so rows stay aligned).
  if (misaligned16(a.q) || misaligned16(a.k) || misaligned16(a.v) ||
      (fwd ? misaligned16(a.o) : misaligned16(a.dout)))
    return "CUDA attention (tensor cores): q, k, v, out and grad_out must be 16-byte aligned";
  if (!(a.scale > 0.0f))  // the forward takes row maxima of the unscaled scores
    return "CUDA attention (tensor cores): the softmax scale must be positive, got " +
           std::to_string(a.scale);
  if (fwd) {
    if (a.fwd_rows_per_warp == 32) return launch_fwd<T, D, 2>(p);
    if (a.fwd_rows_per_warp == 16 || a.fwd_rows_per_warp == 0) return launch_fwd<T, D, 1>(p);
    return "CUDA attention (tensor cores): forward rows per warp must be 16 or 32, got " +
           std::to_string(a.fwd_rows_per_warp);
  }
  if (a.dq32 == nullptr)
    return "CUDA attention (tensor cores): the backward needs the zeroed fp32 dq32 buffer";
  if (a.bwd_warps == 8) return launch_bwd<T, D, 8>(p);
  if (a.bwd_warps == 4 || a.bwd_warps == 0) return launch_bwd<T, D, 4>(p);
  return "CUDA attention (tensor cores): backward warps per block must be 4 or 8, got " +
         std::to_string(a.bwd_warps);
}

}  // namespace sc2_mma
