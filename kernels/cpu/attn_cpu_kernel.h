// Sliding-window grouped-query attention on the CPU: flash-style tiles with an online softmax.
//
// This header is compiled twice (see attn_cpu_kernel.cpp and kernels/build.py): once for the
// baseline instruction set and once with AVX2+FMA, each inside its own namespace (SC2_NS), and
// the bindings pick one at run time. So nothing here may depend on -march.
//
// Layout: q (B, S, H, D), k/v (B, S, KV, D), contiguous; o like q; lse (B, H, S) fp32, holding the
// log-sum-exp of the scores in base-2 units (scores pre-multiplied by scale * log2(e)).
// Query i sees keys j with lo[i] <= j <= i, where lo[i] = max(0, i - window + 1, start of i's
// document run); when document ids are not sorted, each element is also compared by id.
// GQA: query head h reads kv head h / (H / KV) straight from k and v (nothing repeated).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#ifndef SC2_NS
#error "define SC2_NS (the namespace of this instruction-set variant)"
#endif

namespace SC2_NS {

// 8 floats; GCC lowers it to one AVX register or two SSE registers, whatever the target has.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int BQ = 64;  // query rows per tile
constexpr int BK = 64;  // key rows per tile
static_assert(BQ % 4 == 0 && BK % 16 == 0, "micro-kernels tile 4 rows x 16 columns");

static inline v8 vload(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
static inline void vstore(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
static inline v8 vsplat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// 2^x for x <= ~0 (and moderately positive), relative error ~1e-7; x < -126 (and -inf) gives 0.
static inline v8 vexp2(v8 x) {
  const v8 lo = vsplat(-127.0f), hi = vsplat(127.0f);
  v8i dead = x < vsplat(-126.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v8 half = x < vsplat(0.0f) ? vsplat(-0.5f) : vsplat(0.5f);
  v8i n = __builtin_convertvector(x + half, v8i);  // round to nearest
  v8 f = x - __builtin_convertvector(n, v8);          // f in [-0.5, 0.5]
  // Taylor series of e^(f ln 2) up to degree 7: error < 1e-8 on [-0.5, 0.5].
  const float l1 = 0.6931471805599453f, l2 = 0.2402265069591007f, l3 = 0.0555041086648216f,
              l4 = 0.0096181291076285f, l5 = 0.0013333558146428f, l6 = 0.0001540353039338f,
              l7 = 0.0000152527338040f;
  v8 p = vsplat(l7);
  p = p * f + l6; p = p * f + l5; p = p * f + l4; p = p * f + l3; p = p * f + l2;
  p = p * f + l1; p = p * f + 1.0f;
  v8i bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  std::memcpy(&p, &bits, sizeof p);
  return dead ? vsplat(0.0f) : p;
}

static inline float hsum(v8 x) { return x[0] + x[1] + x[2] + x[3] + x[4] + x[5] + x[6] + x[7]; }
static inline float hmax(v8 x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, x[i]);
  return m;
}

// C[M][N] = A[M][K] * Bt[K][N]  (all row-major, M % 4 == 0, N % 16 == 0, lda = K, ldb = ldc = N)
static inline void gemm_set(const float* A, const float* Bt, float* C, int M, int N, int K) {
  for (int i = 0; i < M; i += 4) {
    const float* a0 = A + (i + 0) * K; const float* a1 = A + (i + 1) * K;
    const float* a2 = A + (i + 2) * K; const float* a3 = A + (i + 3) * K;
    for (int j = 0; j < N; j += 16) {
      v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      const float* b = Bt + j;
      for (int k = 0; k < K; ++k, b += N) {
        v8 b0 = vload(b), b1 = vload(b + 8);
        v8 x0 = vsplat(a0[k]), x1 = vsplat(a1[k]), x2 = vsplat(a2[k]), x3 = vsplat(a3[k]);
        c00 += x0 * b0; c01 += x0 * b1; c10 += x1 * b0; c11 += x1 * b1;
        c20 += x2 * b0; c21 += x2 * b1; c30 += x3 * b0; c31 += x3 * b1;
      }
      float* c = C + i * N + j;
      vstore(c, c00); vstore(c + 8, c01); c += N;
      vstore(c, c10); vstore(c + 8, c11); c += N;
      vstore(c, c20); vstore(c + 8, c21); c += N;
      vstore(c, c30); vstore(c + 8, c31);
    }
  }
}

// C[M][N] += A[M][K] * B[K][N]  (row-major; lda = K, ldb = ldc = N; M % 4 == 0, N % 16 == 0)
static inline void gemm_acc(const float* A, const float* B, float* C, int M, int N, int K) {
  for (int i = 0; i < M; i += 4) {
    const float* a0 = A + (i + 0) * K; const float* a1 = A + (i + 1) * K;
    const float* a2 = A + (i + 2) * K; const float* a3 = A + (i + 3) * K;
    for (int j = 0; j < N; j += 16) {
      float* c = C + i * N + j;
      v8 c00 = vload(c), c01 = vload(c + 8);
      v8 c10 = vload(c + N), c11 = vload(c + N + 8);
      v8 c20 = vload(c + 2 * N), c21 = vload(c + 2 * N + 8);
      v8 c30 = vload(c + 3 * N), c31 = vload(c + 3 * N + 8);
      const float* b = B + j;
      for (int k = 0; k < K; ++k, b += N) {
        v8 b0 = vload(b), b1 = vload(b + 8);
        v8 x0 = vsplat(a0[k]), x1 = vsplat(a1[k]), x2 = vsplat(a2[k]), x3 = vsplat(a3[k]);
        c00 += x0 * b0; c01 += x0 * b1; c10 += x1 * b0; c11 += x1 * b1;
        c20 += x2 * b0; c21 += x2 * b1; c30 += x3 * b0; c31 += x3 * b1;
      }
      vstore(c, c00); vstore(c + 8, c01);
      vstore(c + N, c10); vstore(c + N + 8, c11);
      vstore(c + 2 * N, c20); vstore(c + 2 * N + 8, c21);
      vstore(c + 3 * N, c30); vstore(c + 3 * N + 8, c31);
    }
  }
}

// C[M][N] (row stride ldc) += A^T B, with A[K][M] (lda = M) and B[K][N] (ldb = N): the
// transposed product needed for dK and dV without transposing the tile first.
static inline void gemm_tn_acc(const float* A, const float* B, float* C, int M, int N, int K,
                               int64_t ldc) {
  for (int i = 0; i < M; i += 4) {
    for (int j = 0; j < N; j += 16) {
      float* c = C + i * ldc + j;
      v8 c00 = vload(c), c01 = vload(c + 8);
      v8 c10 = vload(c + ldc), c11 = vload(c + ldc + 8);
      v8 c20 = vload(c + 2 * ldc), c21 = vload(c + 2 * ldc + 8);
      v8 c30 = vload(c + 3 * ldc), c31 = vload(c + 3 * ldc + 8);
      const float* a = A + i;
      const float* b = B + j;
      for (int k = 0; k < K; ++k, a += M, b += N) {
        v8 b0 = vload(b), b1 = vload(b + 8);
        v8 x0 = vsplat(a[0]), x1 = vsplat(a[1]), x2 = vsplat(a[2]), x3 = vsplat(a[3]);
        c00 += x0 * b0; c01 += x0 * b1; c10 += x1 * b0; c11 += x1 * b1;
        c20 += x2 * b0; c21 += x2 * b1; c30 += x3 * b0; c31 += x3 * b1;
      }
      vstore(c, c00); vstore(c + 8, c01);
      vstore(c + ldc, c10); vstore(c + ldc + 8, c11);
      vstore(c + 2 * ldc, c20); vstore(c + 2 * ldc + 8, c21);
      vstore(c + 3 * ldc, c30); vstore(c + 3 * ldc + 8, c31);
    }
  }
}

// ---- element types: fp32 and bf16 (stored as uint16_t) ------------------------------------------
static inline float to_f32(float x) { return x; }
static inline float to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void from_f32(float x, float* dst) { *dst = x; }
static inline void from_f32(float x, uint16_t* dst) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *dst = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  *dst = static_cast<uint16_t>(u >> 16);
}

// One row of D elements -> DP floats (times mul), zero padded.
template <typename T>
static inline void load_row(const T* src, float* dst, int D, int DP, float mul) {
  for (int c = 0; c < D; ++c) dst[c] = to_f32(src[c]) * mul;
  for (int c = D; c < DP; ++c) dst[c] = 0.0f;
}

struct Shape {
  int64_t B, S, H, KV, D, DP;
  int64_t window;  // effective window (S when plain causal)
  float scale;     // softmax scale
};

// Per batch row: lo[i] (first key query i may see) and whether ids need element-wise comparison.
struct MaskInfo {
  std::vector<int32_t> lo;
  std::vector<uint8_t> by_id;
  const int64_t* doc = nullptr;

  MaskInfo(const Shape& s, const int64_t* doc_ids) : lo(s.B * s.S), by_id(s.B, 0), doc(doc_ids) {
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t* d = doc ? doc + b * s.S : nullptr;
      bool sorted = true;
      if (d)
        for (int64_t i = 1; i < s.S; ++i)
          if (d[i] < d[i - 1]) { sorted = false; break; }
      by_id[b] = d && !sorted;
      int64_t run = 0;
      for (int64_t i = 0; i < s.S; ++i) {
        if (d && sorted && i > 0 && d[i] != d[i - 1]) run = i;
        lo[b * s.S + i] = static_cast<int32_t>(std::max<int64_t>({int64_t(0), i - s.window + 1, run}));
      }
    }
  }
};

// Threads for a call: small problems run on the calling thread. A parallel region costs a few
// microseconds on an idle machine but a scheduler time slice per barrier when the cores are
// oversubscribed (a tiny model's step went from 0.03 s to 0.7 s), while the work it would share
// is a fraction of a millisecond. The cut-off is about 1M multiply-adds (~0.3 ms on one core).
inline int threads_for(const Shape& s, int nthreads) {
  const double work = static_cast<double>(s.B) * s.H * s.S * std::min(s.S, s.window) * s.D;
  return work < double(1 << 20) ? 1 : std::max(1, nthreads);
}

// Per-thread scratch for one tile.
struct Scratch {
  std::vector<float> q, qraw, o, dO, kt, kp, vt, vp, s, p, tmp, m, l, lse, dd;
  explicit Scratch(int DP)
      : q(BQ * DP), qraw(BQ * DP), o(BQ * DP), dO(BQ * DP), kt(DP * BK), kp(BK * DP),
        vt(DP * BK), vp(BK * DP), s(BQ * BK), p(BQ * BK), tmp(BK * DP), m(BQ), l(BQ), lse(BQ), dd(BQ) {}
};

// Pack nk key rows of kv head g starting at j0: transposed (DP x BK) and/or row-major (BK x DP).
template <typename T>
static inline void pack_keys(const T* base, const Shape& s, int64_t b, int64_t g, int64_t j0, int nk,
                             float* trans, float* rows) {
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  if (trans) std::fill(trans, trans + DP * BK, 0.0f);
  if (rows) std::fill(rows, rows + BK * DP, 0.0f);
  for (int jj = 0; jj < nk; ++jj) {
    const T* src = base + ((b * s.S + j0 + jj) * s.KV + g) * s.D;
    for (int c = 0; c < D; ++c) {
      float x = to_f32(src[c]);
      if (trans) trans[c * BK + jj] = x;
      if (rows) rows[jj * DP + c] = x;
    }
  }
}

// Masks scores of one tile in place (-inf where query i may not see key j). Returns nothing when
// the tile is wholly inside every row's range (the caller checks `tile_full` first).
static inline bool tile_full(const MaskInfo& mi, const Shape& s, int64_t b, int64_t i0, int nq,
                             int64_t j0, int nk) {
  if (mi.by_id[b] || nk < BK) return false;
  return mi.lo[b * s.S + i0 + nq - 1] <= j0 && j0 + nk - 1 <= i0;
}

static inline bool allowed(const MaskInfo& mi, const Shape& s, int64_t b, int64_t i, int64_t j) {
  if (j > i || j < mi.lo[b * s.S + i]) return false;
  if (mi.by_id[b]) return mi.doc[b * s.S + i] == mi.doc[b * s.S + j];
  return true;
}

template <typename T>
void forward(const T* q, const T* k, const T* v, T* o, float* lse, const int64_t* doc, const Shape& s,
             int nthreads) {
  const MaskInfo mi(s, doc);
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  const int64_t group = s.H / s.KV, nqb = (s.S + BQ - 1) / BQ;
  const int64_t ntasks = s.B * s.H * nqb;
  const float scale2 = s.scale * 1.4426950408889634f;  // scores in base-2 units
  const float ninf = -INFINITY;
#pragma omp parallel num_threads(threads_for(s, nthreads))
  {
    Scratch w(DP);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      // Latest query blocks first: they have the most keys to visit (better load balance).
      const int64_t qb = nqb - 1 - t % nqb, h = (t / nqb) % s.H, b = t / (nqb * s.H);
      const int64_t g = h / group, i0 = qb * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, s.S - i0));
      for (int r = 0; r < BQ; ++r) {
        if (r < nq) load_row(q + ((b * s.S + i0 + r) * s.H + h) * s.D, &w.q[r * DP], D, DP, scale2);
        else std::fill(&w.q[r * DP], &w.q[r * DP] + DP, 0.0f);
        w.m[r] = ninf;
        w.l[r] = 0.0f;
      }
      std::fill(w.o.begin(), w.o.end(), 0.0f);
      const int64_t klo = mi.lo[b * s.S + i0], khi = i0 + nq;  // keys [klo, khi)
      for (int64_t j0 = klo; j0 < khi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, khi - j0));
        pack_keys(k, s, b, g, j0, nk, w.kt.data(), nullptr);
        pack_keys(v, s, b, g, j0, nk, nullptr, w.vp.data());
        gemm_set(w.q.data(), w.kt.data(), w.s.data(), BQ, BK, DP);
        const bool full = tile_full(mi, s, b, i0, nq, j0, nk);
        for (int r = 0; r < BQ; ++r) {
          float* row = &w.s[r * BK];
          if (r >= nq) { std::fill(row, row + BK, 0.0f); continue; }
          if (!full)
            for (int jj = 0; jj < BK; ++jj)
              if (jj >= nk || !allowed(mi, s, b, i0 + r, j0 + jj)) row[jj] = ninf;
          v8 mx = vload(row);
          for (int jj = 8; jj < BK; jj += 8) { v8 x = vload(row + jj); mx = x > mx ? x : mx; }
          const float rmax = hmax(mx);
          if (rmax == ninf) { std::fill(row, row + BK, 0.0f); continue; }
          const float mnew = std::max(w.m[r], rmax);
          const float alpha = w.m[r] == ninf ? 0.0f : vexp2(vsplat(w.m[r] - mnew))[0];
          v8 acc = {};
          const v8 mv = vsplat(mnew);
          for (int jj = 0; jj < BK; jj += 8) {
            v8 p = vexp2(vload(row + jj) - mv);
            vstore(row + jj, p);
            acc += p;
          }
          w.l[r] = w.l[r] * alpha + hsum(acc);
          w.m[r] = mnew;
          if (alpha != 1.0f) {
            float* orow = &w.o[r * DP];
            for (int c = 0; c < DP; ++c) orow[c] *= alpha;
          }
        }
        gemm_acc(w.s.data(), w.vp.data(), w.o.data(), BQ, DP, BK);
      }
      for (int r = 0; r < nq; ++r) {
        const float inv = 1.0f / w.l[r];
        T* dst = o + ((b * s.S + i0 + r) * s.H + h) * s.D;
        for (int c = 0; c < D; ++c) from_f32(w.o[r * DP + c] * inv, dst + c);
        lse[(b * s.H + h) * s.S + i0 + r] = w.m[r] + std::log2(w.l[r]);
      }
    }
  }
}

template <typename T>
void backward(const T* q, const T* k, const T* v, const T* o, const T* dout, const float* lse,
              const int64_t* doc, T* dq, T* dk, T* dv, const Shape& s, int nthreads) {
  const MaskInfo mi(s, doc);
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  const int64_t group = s.H / s.KV, nqb = (s.S + BQ - 1) / BQ;
  const float scale2 = s.scale * 1.4426950408889634f;
  const int nt = threads_for(s, nthreads);

  // One query tile (batch b, head h, query block qb): dQ of its rows is written out; dK/dV of
  // the keys it sees are added into fp32 accumulators at dk_base/dv_base, key row j at
  // j * ldc + col (floats).
  auto tile = [&](Scratch& w, int64_t b, int64_t h, int64_t qb, float* dk_base, float* dv_base,
                  int64_t ldc, int64_t col) {
    const int64_t g = h / group, i0 = qb * BQ;
    const int nq = static_cast<int>(std::min<int64_t>(BQ, s.S - i0));
    for (int r = 0; r < BQ; ++r) {
      float* qr = &w.qraw[r * DP];
      float* dor = &w.dO[r * DP];
      if (r < nq) {
        const int64_t off = ((b * s.S + i0 + r) * s.H + h) * s.D;
        load_row(q + off, qr, D, DP, 1.0f);
        load_row(dout + off, dor, D, DP, 1.0f);
        load_row(o + off, &w.o[r * DP], D, DP, 1.0f);
        float dd = 0.0f;
        for (int c = 0; c < D; ++c) dd += dor[c] * w.o[r * DP + c];
        w.dd[r] = dd;
        w.lse[r] = lse[(b * s.H + h) * s.S + i0 + r];
      } else {
        std::fill(qr, qr + DP, 0.0f);
        std::fill(dor, dor + DP, 0.0f);
        w.dd[r] = 0.0f;
        w.lse[r] = 0.0f;
      }
      for (int c = 0; c < DP; ++c) w.q[r * DP + c] = qr[c] * scale2;
    }
    std::fill(w.o.begin(), w.o.end(), 0.0f);  // reused as the dQ accumulator
    const int64_t klo = mi.lo[b * s.S + i0], khi = i0 + nq;
    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
      const int nk = static_cast<int>(std::min<int64_t>(BK, khi - j0));
      pack_keys(k, s, b, g, j0, nk, w.kt.data(), w.kp.data());
      pack_keys(v, s, b, g, j0, nk, w.vt.data(), nullptr);
      gemm_set(w.q.data(), w.kt.data(), w.s.data(), BQ, BK, DP);    // scores (base 2)
      gemm_set(w.dO.data(), w.vt.data(), w.p.data(), BQ, BK, DP);   // dP = dO V^T
      const bool full = tile_full(mi, s, b, i0, nq, j0, nk);
      for (int r = 0; r < BQ; ++r) {
        float* srow = &w.s[r * BK];
        float* dprow = &w.p[r * BK];
        if (r >= nq) {
          std::fill(srow, srow + BK, 0.0f);
          std::fill(dprow, dprow + BK, 0.0f);
          continue;
        }
        if (!full)
          for (int jj = 0; jj < BK; ++jj)
            if (jj >= nk || !allowed(mi, s, b, i0 + r, j0 + jj)) srow[jj] = -INFINITY;
        const v8 lv = vsplat(w.lse[r]), dv8 = vsplat(w.dd[r]);
        for (int jj = 0; jj < BK; jj += 8) {
          v8 p = vexp2(vload(srow + jj) - lv);
          vstore(srow + jj, p);                                   // P
          vstore(dprow + jj, p * (vload(dprow + jj) - dv8));      // dS (w.r.t. scaled scores)
        }
      }
      // dV[j] += P^T dO ; dK[j] += dS^T Q ; dQ += dS K  (softmax scale applied at the end).
      // A full tile adds straight into the accumulators; the last, partial tile of a row goes
      // through a scratch tile so that nothing lands beyond its nk keys.
      float* dv_dst = dv_base + j0 * ldc + col;
      float* dk_dst = dk_base + j0 * ldc + col;
      if (nk == BK) {
        gemm_tn_acc(w.s.data(), w.dO.data(), dv_dst, BK, DP, BQ, ldc);
        gemm_tn_acc(w.p.data(), w.qraw.data(), dk_dst, BK, DP, BQ, ldc);
      } else {
        for (int pass = 0; pass < 2; ++pass) {
          std::fill(w.tmp.begin(), w.tmp.end(), 0.0f);
          gemm_tn_acc(pass ? w.p.data() : w.s.data(), pass ? w.qraw.data() : w.dO.data(),
                      w.tmp.data(), BK, DP, BQ, DP);
          float* dst = pass ? dk_dst : dv_dst;
          for (int jj = 0; jj < nk; ++jj)
            for (int c = 0; c < DP; ++c) dst[jj * ldc + c] += w.tmp[jj * DP + c];
        }
      }
      gemm_acc(w.p.data(), w.kp.data(), w.o.data(), BQ, DP, BK);
    }
    for (int r = 0; r < nq; ++r) {
      T* dst = dq + ((b * s.S + i0 + r) * s.H + h) * s.D;
      for (int c = 0; c < D; ++c) from_f32(w.o[r * DP + c] * s.scale, dst + c);
    }
  };

  const int64_t groups = s.B * s.KV;
  if (nt == 1 || groups % nt == 0 || groups >= 4 * nt) {
    // Enough (batch, kv head) pairs to share out evenly: each task owns the dK/dV of one pair
    // (every query head of its group, every query tile), so one parallel region and no sums
    // across threads; a task's order of additions is fixed, so the result does not depend on
    // the thread count either.
    const int64_t kv_elems = s.S * s.DP;
    std::vector<float> acc(static_cast<size_t>(nt) * 2 * kv_elems);
#pragma omp parallel num_threads(nt)
    {
      float* dk_acc = acc.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * kv_elems;
      float* dv_acc = dk_acc + kv_elems;
      Scratch w(DP);
#pragma omp for schedule(static, 1)
      for (int64_t t = 0; t < groups; ++t) {
        const int64_t b = t / s.KV, g = t % s.KV;
        std::fill(dk_acc, dk_acc + 2 * kv_elems, 0.0f);
        for (int64_t hh = 0; hh < group; ++hh)
          for (int64_t qb = nqb - 1; qb >= 0; --qb)
            tile(w, b, g * group + hh, qb, dk_acc, dv_acc, s.DP, 0);
        for (int64_t j = 0; j < s.S; ++j) {
          const int64_t out = ((b * s.S + j) * s.KV + g) * s.D;
          for (int c = 0; c < D; ++c) {
            from_f32(dk_acc[j * s.DP + c] * s.scale, dk + out + c);
            from_f32(dv_acc[j * s.DP + c], dv + out + c);
          }
        }
      }
    }
    return;
  }

  // Few pairs (one long sequence): query tiles are shared out instead, per batch element. dK
  // and dV gather contributions from many query tiles: each thread owns an fp32 copy for one
  // batch element at a time (batch elements never share keys), zeroed before each.
  const int64_t ntasks = s.H * nqb;  // per batch element
  const int64_t kv_elems = s.S * s.KV * s.DP;  // one thread's dK (or dV) accumulator
  std::vector<float> acc(static_cast<size_t>(nt) * 2 * kv_elems);
  for (int64_t b = 0; b < s.B; ++b)
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    float* dk_acc = acc.data() + static_cast<size_t>(tid) * 2 * kv_elems;
    float* dv_acc = dk_acc + kv_elems;
    std::fill(dk_acc, dk_acc + 2 * kv_elems, 0.0f);
    Scratch w(DP);
    // Static round-robin: each thread sees the same tasks in the same order on every run, so the
    // fp32 sums into its accumulator (and the gradients) are bit-for-bit reproducible.
#pragma omp for schedule(static, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t qb = nqb - 1 - t % nqb, h = t / nqb;
      tile(w, b, h, qb, dk_acc, dv_acc, s.KV * s.DP, (h / group) * s.DP);
    }
    // Sum the per-thread accumulators into this batch element's dk/dv, row by row.
    const int64_t rows = s.S * s.KV;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t out_row = b * rows + row;
      for (int c = 0; c < D; ++c) {
        float sk = 0.0f, sv = 0.0f;
        for (int th = 0; th < nt; ++th) {
          const float* base = acc.data() + static_cast<size_t>(th) * 2 * kv_elems;
          sk += base[row * s.DP + c];
          sv += base[kv_elems + row * s.DP + c];
        }
        from_f32(sk * s.scale, dk + out_row * s.D + c);
        from_f32(sv, dv + out_row * s.D + c);
      }
    }
  }
}

}  // namespace SC2_NS
