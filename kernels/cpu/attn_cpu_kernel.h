// Sliding-window grouped-query attention on the CPU: flash-style tiles with an online softmax.
//
// This header is compiled once per instruction-set variant (see attn_cpu_kernel.cpp and
// kernels/build.py: baseline x86-64, AVX2+FMA, AVX-512), each inside its own namespace (SC2_NS),
// and the bindings pick one at run time. The vector width and the register-tile sizes follow the
// variant's target macros (__AVX512F__, __AVX2__), so nothing else may depend on -march.
//
// Layout: q (B, Sq, H, D), k/v (B, S, KV, D) with Sq <= S, contiguous; o like q; lse (B, H, Sq)
// fp32, holding the log-sum-exp of the scores in base-2 units (scores pre-multiplied by
// scale * log2(e)). The queries are the last Sq positions of the key sequence: query row t is at
// position i = t + off, off = S - Sq (a context-parallel chunk after its halo; off = 0 is plain
// self-attention). Position i sees keys j with lo[i] <= j <= i, where lo[i] = max(0,
// i - window + 1, start of i's document run); when document ids (B, S) are not sorted, each
// element is also compared by id. Masks and tiles work on positions; only the loads and stores
// of q, o, dO, dQ and lse use query rows.
//
// Scores are kept transposed, S^T (keys x queries): one vector holds one key against VW
// consecutive queries, so the softmax's running max, sum and rescale are plain vector operations
// (no horizontal reductions) and the masks are vector compares against each query's key range.
// Work is shared out per (batch, kv head, query tile): each K/V tile is converted and packed once
// and used by every query head of the GQA group.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef SC2_NS
#error "define SC2_NS (the namespace of this instruction-set variant)"
#endif

namespace SC2_NS {

// VW floats per vector; NACC: accumulator vectors of a register tile (AVX-512 has 32 vector
// registers, AVX2 and SSE 16).
#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int NACC = 16;
#elif defined(__AVX2__)
constexpr int VW = 8;
constexpr int NACC = 8;
#else
constexpr int VW = 4;
constexpr int NACC = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

constexpr int BQ = 64;  // query rows per tile
constexpr int BK = 64;  // key rows per tile
constexpr int MRND = 8;  // key rows of a partial tile are rounded up to this (register tile rows)
constexpr int QV = BQ / VW;  // vectors per S^T row
static_assert(BQ % (4 * VW) == 0 && BK % MRND == 0, "tile sizes");

static inline vf vload(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
static inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
static inline vi viload(const int32_t* p) { vi r; std::memcpy(&r, p, sizeof r); return r; }
static inline vf vsplat(float x) { return x - vf{}; }  // x - 0 == x, -0 and NaN included
static inline vi visplat(int32_t x) { return x - vi{}; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x, relative error < 1e-7 (degree-6 fit of 2^f on [-0.5, 0.5], 7.9e-8 measured in fp32);
// x below about -150 and -inf give 0, NaN stays NaN.
static inline vf vpoly2(vf f) {
  vf p = vsplat(1.5345810970757157e-04f);
  p = p * f + 1.3399930903688073e-03f;
  p = p * f + 9.6184890717267990e-03f;
  p = p * f + 5.5503286421298980e-02f;
  p = p * f + 2.4022646248340607e-01f;
  p = p * f + 6.9314718246459961e-01f;
  return p * f + 1.0f;
}
#if defined(__AVX512F__)
static inline vf vexp2(vf x) {
  // max(-200, x) keeps NaN (vmaxps returns its second operand when either is NaN); scalef then
  // does the exponent, underflow to 0 included.
  // (The mask forms with every lane set: the plain intrinsics trip GCC 12's -Wmaybe-uninitialized.)
  const __mmask16 all = 0xffff;
  const __m512 lo = _mm512_set1_ps(-200.0f);
  const __m512 xm = _mm512_mask_max_ps(lo, all, lo, (__m512)x);
  const __m512 n = _mm512_mask_roundscale_ps(xm, all, xm, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf p = vpoly2((vf)xm - (vf)n);
  return (vf)_mm512_mask_scalef_ps((__m512)p, all, (__m512)p, n);
}
#else
static inline vf vexp2(vf x) {
  const vi dead = x < vsplat(-126.0f);
  x = x < vsplat(-127.0f) ? vsplat(-127.0f) : x;
  x = x > vsplat(127.0f) ? vsplat(127.0f) : x;
  const vf half = x < vsplat(0.0f) ? vsplat(-0.5f) : vsplat(0.5f);
  const vi n = __builtin_convertvector(x + half, vi);  // round to nearest
  vf p = vpoly2(x - __builtin_convertvector(n, vf));
  vi bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  std::memcpy(&p, &bits, sizeof p);
  return dead ? vsplat(0.0f) : p;
}
#endif

// ---- matrix products on register tiles ------------------------------------------------------
// C[M][N] (row stride ldc) = or += sum_k A(m, k) * B[k][n], where A(m, k) = A[m * sm + k * sk] is
// broadcast (any layout: sm = lda, sk = 1 for A row-major, sm = 1, sk = lda for A^T) and B is
// row-major (stride ldb) read as vectors. N % VW == 0, M % (rows of the tile) == 0 (M % 8 == 0
// always works). When accumulating, cs (if given) scales C's columns first (the online softmax's
// rescale of O^T by alpha).
template <int MR, int NV, bool ACC>
static inline void micro(const float* A, int64_t sm, int64_t sk, const float* B, int64_t ldb,
                         float* C, int64_t ldc, int K, const float* cs) {
  vf c[MR][NV];
  if (ACC) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] = vload(C + r * ldc + v * VW);
    if (cs) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const vf sc = vload(cs + v * VW);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) c[r][v] *= sc;
      }
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] = vf{};
  }
  for (int k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * VW);
    const float* a = A + k * sk;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf x = vsplat(a[r * sm]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] += x * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * VW, c[r][v]);
}

template <bool ACC>
static inline void gemm(int M, int N, int K, const float* A, int64_t sm, int64_t sk,
                        const float* B, int64_t ldb, float* C, int64_t ldc,
                        const float* cs = nullptr) {
  constexpr int MR4 = NACC / 4, MR2 = NACC / 2, MR1 = NACC < 8 ? NACC : 8;
  static_assert(8 % MR4 == 0 && 8 % MR2 == 0 && 8 % MR1 == 0, "tile rows divide 8");
  int n = 0;
  for (; n + 4 * VW <= N; n += 4 * VW)
    for (int m = 0; m < M; m += MR4)
      micro<MR4, 4, ACC>(A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc, K, cs ? cs + n : cs);
  for (; n + 2 * VW <= N; n += 2 * VW)
    for (int m = 0; m < M; m += MR2)
      micro<MR2, 2, ACC>(A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc, K, cs ? cs + n : cs);
  for (; n < N; n += VW)
    for (int m = 0; m < M; m += MR1)
      micro<MR1, 1, ACC>(A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc, K, cs ? cs + n : cs);
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

// 64-byte aligned float scratch (vectors never straddle cache lines).
struct Buf {
  float* p = nullptr;
  explicit Buf(size_t n) {
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  float* operator+(size_t off) const { return p + off; }
  float& operator[](size_t i) const { return p[i]; }
};

struct Shape {
  int64_t B, S, Sq, H, KV, D, DP;  // S keys, Sq <= S queries
  int64_t off;     // S - Sq: position of query row 0
  int64_t window;  // effective window (S when plain causal)
  float scale;     // softmax scale
};

// Per batch row: lo[i] (first key query i may see) and, where the ids are not sorted, a dense
// int32 rank of each id (equal ranks <=> equal ids) for vector comparison.
struct MaskInfo {
  std::vector<int32_t> lo;
  std::vector<uint8_t> by_id;
  std::vector<int32_t> rank;

  MaskInfo(const Shape& s, const int64_t* doc) : lo(s.B * s.S), by_id(s.B, 0) {
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
      if (by_id[b]) {
        if (rank.empty()) rank.assign(s.B * s.S, 0);
        std::vector<int64_t> ids(d, d + s.S);
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        for (int64_t i = 0; i < s.S; ++i)
          rank[b * s.S + i] = static_cast<int32_t>(std::lower_bound(ids.begin(), ids.end(), d[i]) - ids.begin());
      }
    }
  }
};

// Threads for a call: small problems run on the calling thread. A parallel region costs a few
// microseconds on an idle machine but a scheduler time slice per barrier when the cores are
// oversubscribed (a tiny model's step went from 0.03 s to 0.7 s), while the work it would share
// is a fraction of a millisecond. The cut-off is about 4M multiply-adds (~0.05-0.1 ms on one
// core of the AVX-512 build; it was 1M when a core did a third of that).
inline int threads_for(const Shape& s, int nthreads) {
  const double work = static_cast<double>(s.B) * s.H * s.Sq * std::min(s.S, s.window) * s.D;
  return work < double(1 << 22) ? 1 : std::max(1, nthreads);
}

// The query rows of one tile as the masks see them: position, first visible key (INT32_MAX on
// padding rows, which then see nothing) and document rank. i0 is the first row's position.
struct QueryRows {
  alignas(64) int32_t pos[BQ];
  alignas(64) int32_t lo[BQ];
  alignas(64) int32_t rank[BQ];
  int64_t i0 = 0;
  int nq = 0;
  bool by_id = false;
  const int32_t* key_rank = nullptr;  // rank of key j at key_rank[j] (this batch row)

  // Query rows t0 .. t0 + nq_ - 1 (positions from s.off + t0).
  void set(const MaskInfo& mi, const Shape& s, int64_t b, int64_t t0, int nq_) {
    i0 = s.off + t0;
    nq = nq_;
    by_id = mi.by_id[b];
    key_rank = by_id ? mi.rank.data() + b * s.S : nullptr;
    for (int r = 0; r < BQ; ++r) {
      pos[r] = static_cast<int32_t>(i0 + r);
      lo[r] = r < nq ? mi.lo[b * s.S + i0 + r] : INT32_MAX;
      rank[r] = r < nq && by_id ? key_rank[i0 + r] : 0;
    }
  }
  // True when every query of the tile sees every key j0 .. j0 + BK - 1 (no mask needed).
  bool full(int64_t j0, int nk) const {
    return !by_id && nk == BK && nq == BQ && lo[BQ - 1] <= j0 && j0 + BK - 1 <= i0;
  }
  // -inf where query vector v may not see key j.
  vf mask(vf x, int64_t j, int v) const {
    const vi jv = visplat(static_cast<int32_t>(j));
    vi ok = (jv <= viload(pos + v * VW)) & (viload(lo + v * VW) <= jv);
    if (by_id) ok &= viload(rank + v * VW) == visplat(key_rank[j]);
    return ok ? x : vsplat(-INFINITY);
  }
};

// Which parts of a key tile any query of the tile can see, in blocks of MRND keys x VW queries:
// key block kb (keys j0 + MRND*kb ...) is seen by query vectors [a[kb], b[kb]) only, and query
// vector v by key rows [jlo[v], jhi[v]) only (both contiguous, because lo is non-decreasing;
// with unsorted ids this is the window's shape, a superset). Blocks outside are fully masked:
// their scores are neither computed nor read. `uniform`: every active query vector has the same
// key rows (then the products run on whole register tiles instead of one vector at a time).
struct TileMask {
  int nb = 0;  // key blocks (nk rounded up to MRND, over MRND)
  int a[BK / MRND], b[BK / MRND];
  int jlo[QV], jhi[QV];
  int va = 0, vb = 0;  // active query vectors: [va, vb)
  bool full = false, uniform = false;

  // False when no query of the tile sees any key of it.
  bool set(const QueryRows& rows, int64_t j0, int nk) {
    nb = (nk + MRND - 1) / MRND;
    full = rows.full(j0, nk);
    va = QV;
    vb = 0;
    for (int kb = 0; kb < nb; ++kb) {
      const int64_t jb = j0 + kb * MRND, je = std::min<int64_t>(jb + MRND, j0 + nk) - 1;
      // Rows that see some key of [jb, je]: i >= jb (a suffix) and lo <= je (a prefix).
      const int r0 = static_cast<int>(std::max<int64_t>(0, jb - rows.i0));
      const int r1 = static_cast<int>(std::upper_bound(rows.lo, rows.lo + rows.nq,
                                                       static_cast<int32_t>(std::min<int64_t>(je, INT32_MAX - 1))) - rows.lo);
      if (r0 >= r1) { a[kb] = b[kb] = 0; continue; }
      a[kb] = r0 / VW;
      b[kb] = (r1 - 1) / VW + 1;
      va = std::min(va, a[kb]);
      vb = std::max(vb, b[kb]);
    }
    if (va >= vb) return false;
    uniform = true;
    for (int v = va; v < vb; ++v) {
      int lo_b = -1, hi_b = -1;
      for (int kb = 0; kb < nb; ++kb)
        if (a[kb] <= v && v < b[kb]) { if (lo_b < 0) lo_b = kb; hi_b = kb; }
      jlo[v] = lo_b < 0 ? 0 : lo_b * MRND;
      jhi[v] = lo_b < 0 ? 0 : (hi_b + 1) * MRND;
      if (jlo[v] != jlo[va] || jhi[v] != jhi[va]) uniform = false;
    }
    return true;
  }
};

// Pack nk key rows of kv head g from j0 row-major into dst (BK x DP floats); the other rows and
// columns stay zero (dst is zeroed here when the tile is partial or the head dim is padded).
template <typename T>
static inline void pack_rows(const T* base, const Shape& s, int64_t b, int64_t g, int64_t j0, int nk,
                             float* dst) {
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  if (nk < BK || D < DP) std::memset(dst, 0, sizeof(float) * BK * DP);
  for (int jj = 0; jj < nk; ++jj) {
    const T* src = base + ((b * s.S + j0 + jj) * s.KV + g) * s.D;
    float* row = dst + jj * DP;
    for (int c = 0; c < D; ++c) row[c] = to_f32(src[c]);
  }
}

// Query-tile rows i0 .. i0 + nq - 1 (query rows, not positions) of head h transposed into dst
// (DP x BQ: dst[c * BQ + r]) times mul, and (if rows) row-major into rows (BQ x DP); padding zero.
template <typename T>
static inline void load_tile(const T* base, const Shape& s, int64_t b, int64_t h, int64_t i0, int nq,
                             float mul, float* trans, float* rows) {
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  std::memset(trans, 0, sizeof(float) * DP * BQ);
  if (rows) std::memset(rows, 0, sizeof(float) * BQ * DP);
  for (int r = 0; r < nq; ++r) {
    const T* src = base + ((b * s.Sq + i0 + r) * s.H + h) * s.D;
    for (int c = 0; c < D; ++c) {
      const float x = to_f32(src[c]);
      trans[c * BQ + r] = x * mul;
      if (rows) rows[r * DP + c] = x;
    }
  }
}

template <typename T>
void forward(const T* q, const T* k, const T* v, T* o, float* lse, const int64_t* doc, const Shape& s,
             int nthreads) {
  const MaskInfo mi(s, doc);
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  const int group = static_cast<int>(s.H / s.KV);
  const int64_t nqb = (s.Sq + BQ - 1) / BQ, ntasks = s.B * s.KV * nqb;
  const float scale2 = s.scale * 1.4426950408889634f;  // scores in base-2 units
  const size_t tile = static_cast<size_t>(DP) * BQ;
#pragma omp parallel num_threads(threads_for(s, nthreads))
  {
    // Per thread: the packed K/V tile, S^T (then P^T), and per query head of the group its
    // scaled Q^T, the O^T accumulator, the running max m and sum l.
    Buf kp(BK * DP), vp(BK * DP), st(BK * BQ), qt(group * tile), ot(group * tile);
    Buf m(group * BQ), l(group * BQ), alpha(BQ);
    QueryRows rows;
    TileMask tm;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      // Latest query blocks first: they have the most keys to visit (better load balance).
      const int64_t qb = nqb - 1 - t % nqb, g = (t / nqb) % s.KV, b = t / (nqb * s.KV);
      const int64_t i0 = qb * BQ;
      const int nq = static_cast<int>(std::min<int64_t>(BQ, s.Sq - i0));
      rows.set(mi, s, b, i0, nq);
      for (int hh = 0; hh < group; ++hh) {
        load_tile(q, s, b, g * group + hh, i0, nq, scale2, qt + hh * tile, nullptr);
        std::memset(ot + hh * tile, 0, sizeof(float) * tile);
        std::fill(m + hh * BQ, m + (hh + 1) * BQ, -INFINITY);
        std::fill(l + hh * BQ, l + (hh + 1) * BQ, 0.0f);
      }
      const int64_t klo = mi.lo[b * s.S + rows.i0], khi = rows.i0 + nq;  // keys [klo, khi)
      for (int64_t j0 = klo; j0 < khi; j0 += BK) {
        const int nk = static_cast<int>(std::min<int64_t>(BK, khi - j0));
        if (!tm.set(rows, j0, nk)) continue;
        const int va = tm.va, vb = tm.vb;
        pack_rows(k, s, b, g, j0, nk, kp.p);
        pack_rows(v, s, b, g, j0, nk, vp.p);
        for (int hh = 0; hh < group; ++hh) {
          float* mh = m + hh * BQ;
          float* lh = l + hh * BQ;
          const float* qh = qt + hh * tile;
          // S^T = K Q^T, block by block of keys, over the query vectors that see them.
          for (int kb = 0; kb < tm.nb; ++kb)
            if (tm.a[kb] < tm.b[kb])
              gemm<false>(MRND, (tm.b[kb] - tm.a[kb]) * VW, D, kp + kb * MRND * DP, DP, 1,
                          qh + tm.a[kb] * VW, BQ, st + kb * MRND * BQ + tm.a[kb] * VW, BQ);
          // Online softmax over this tile's keys, VW queries per vector.
          for (int vv = va; vv < vb; ++vv) {
            const int jl = tm.jlo[vv], jh = std::min(tm.jhi[vv], nk);
            vf mx = vsplat(-INFINITY);
            for (int j = jl; j < jh; ++j) {
              float* p = st + j * BQ + vv * VW;
              vf x = vload(p);
              if (!tm.full) { x = rows.mask(x, j0 + j, vv); vstore(p, x); }
              mx = vmax(mx, x);
            }
            const vf mold = vload(mh + vv * VW);
            const vf mnew = vmax(mold, mx);
            const vf ms = mnew == vsplat(-INFINITY) ? vsplat(0.0f) : mnew;  // rows that saw nothing
            const vf al = vexp2(mold - ms);
            vf sum0 = {}, sum1 = {};
            int j = jl;
            for (; j + 1 < jh; j += 2) {
              float* p = st + j * BQ + vv * VW;
              const vf p0 = vexp2(vload(p) - ms), p1 = vexp2(vload(p + BQ) - ms);
              vstore(p, p0);
              vstore(p + BQ, p1);
              sum0 += p0;
              sum1 += p1;
            }
            if (j < jh) {
              float* p = st + j * BQ + vv * VW;
              const vf p0 = vexp2(vload(p) - ms);
              vstore(p, p0);
              sum0 += p0;
            }
            vstore(lh + vv * VW, vload(lh + vv * VW) * al + (sum0 + sum1));
            vstore(mh + vv * VW, mnew);
            vstore(alpha + vv * VW, al);
          }
          // O^T = O^T * alpha + V^T P^T (over each query vector's key rows).
          float* oh = ot + hh * tile;
          if (tm.uniform) {
            const int jl = tm.jlo[va], jh = std::min(tm.jhi[va], nk);
            gemm<true>(DP, (vb - va) * VW, jh - jl, vp + jl * DP, 1, DP, st + jl * BQ + va * VW, BQ,
                       oh + va * VW, BQ, alpha + va * VW);
          } else {
            for (int vv = va; vv < vb; ++vv) {
              const int jl = tm.jlo[vv], jh = std::min(tm.jhi[vv], nk);
              gemm<true>(DP, VW, jh - jl, vp + jl * DP, 1, DP, st + jl * BQ + vv * VW, BQ,
                         oh + vv * VW, BQ, alpha + vv * VW);
            }
          }
        }
      }
      for (int hh = 0; hh < group; ++hh) {
        const int64_t h = g * group + hh;
        const float* oh = ot + hh * tile;
        for (int r = 0; r < nq; ++r) {
          const float lr = l[hh * BQ + r], inv = 1.0f / lr;
          T* dst = o + ((b * s.Sq + i0 + r) * s.H + h) * s.D;
          for (int c = 0; c < D; ++c) from_f32(oh[c * BQ + r] * inv, dst + c);
          lse[(b * s.H + h) * s.Sq + i0 + r] = m[hh * BQ + r] + std::log2(lr);
        }
      }
    }
  }
}

template <typename T>
void backward(const T* q, const T* k, const T* v, const T* o, const T* dout, const float* lse,
              const int64_t* doc, T* dq, T* dk, T* dv, const Shape& s, int nthreads) {
  const MaskInfo mi(s, doc);
  const int D = static_cast<int>(s.D), DP = static_cast<int>(s.DP);
  const int group = static_cast<int>(s.H / s.KV);
  const int64_t nqb = (s.Sq + BQ - 1) / BQ;
  const float scale2 = s.scale * 1.4426950408889634f;
  const int nt = threads_for(s, nthreads);
  const size_t tile = static_cast<size_t>(DP) * BQ;

  // Per-thread scratch: packed K/V tile, S^T (then P^T), dP^T (then dS^T); per query head of
  // the group: Q (rows), scaled Q^T, dO (rows), dO^T, the dQ^T accumulator, lse and D_i.
  struct Work {
    Buf kp, vp, st, dpt, qr, qt, dor, dot, dqt, ls, dd, ot;
    QueryRows rows;
    TileMask tm;
    Work(int DP, int group, size_t tile)
        : kp(BK * DP), vp(BK * DP), st(BK * BQ), dpt(BK * BQ), qr(group * tile), qt(group * tile),
          dor(group * tile), dot(group * tile), dqt(group * tile), ls(group * BQ), dd(group * BQ),
          ot(tile) {}
  };

  // One query tile (batch b, kv head g, query block qb) for every query head of the group: dQ of
  // its rows is written out; dK/dV of the keys it sees are added into fp32 accumulators at
  // dk_base/dv_base, key row j at j * ldc (floats), which have at least MRND - 1 rows to spare
  // beyond the last key (a partial tile's rounded-up rows add exact zeros there).
  auto query_tile = [&](Work& w, int64_t b, int64_t g, int64_t qb, float* dk_base, float* dv_base,
                        int64_t ldc) {
    const int64_t i0 = qb * BQ;
    const int nq = static_cast<int>(std::min<int64_t>(BQ, s.Sq - i0));
    w.rows.set(mi, s, b, i0, nq);
    for (int hh = 0; hh < group; ++hh) {
      const int64_t h = g * group + hh;
      load_tile(q, s, b, h, i0, nq, scale2, w.qt + hh * tile, w.qr + hh * tile);
      load_tile(dout, s, b, h, i0, nq, 1.0f, w.dot + hh * tile, w.dor + hh * tile);
      load_tile(o, s, b, h, i0, nq, 1.0f, w.ot.p, nullptr);
      std::memset(w.dqt + hh * tile, 0, sizeof(float) * tile);
      float* ddh = w.dd + hh * BQ;
      float* lsh = w.ls + hh * BQ;
      for (int vv = 0; vv < QV; ++vv) {  // D_i = sum_c dO[i][c] O[i][c], vertically
        vf acc = {};
        for (int c = 0; c < D; ++c)
          acc += vload(w.dot + hh * tile + c * BQ + vv * VW) * vload(w.ot + c * BQ + vv * VW);
        vstore(ddh + vv * VW, acc);
      }
      for (int r = 0; r < BQ; ++r) lsh[r] = r < nq ? lse[(b * s.H + h) * s.Sq + i0 + r] : 0.0f;
    }
    const int64_t klo = mi.lo[b * s.S + w.rows.i0], khi = w.rows.i0 + nq;
    TileMask& tm = w.tm;
    for (int64_t j0 = klo; j0 < khi; j0 += BK) {
      const int nk = static_cast<int>(std::min<int64_t>(BK, khi - j0));
      if (!tm.set(w.rows, j0, nk)) continue;
      const int va = tm.va, vb = tm.vb;
      pack_rows(k, s, b, g, j0, nk, w.kp.p);
      pack_rows(v, s, b, g, j0, nk, w.vp.p);
      for (int hh = 0; hh < group; ++hh) {
        const float* lsh = w.ls + hh * BQ;
        const float* ddh = w.dd + hh * BQ;
        for (int kb = 0; kb < tm.nb; ++kb) {  // S^T = K Q^T, dP^T = V dO^T
          if (tm.a[kb] >= tm.b[kb]) continue;
          const int n0 = tm.a[kb] * VW, nn = (tm.b[kb] - tm.a[kb]) * VW;
          gemm<false>(MRND, nn, D, w.kp + kb * MRND * DP, DP, 1, w.qt + hh * tile + n0, BQ,
                      w.st + kb * MRND * BQ + n0, BQ);
          gemm<false>(MRND, nn, D, w.vp + kb * MRND * DP, DP, 1, w.dot + hh * tile + n0, BQ,
                      w.dpt + kb * MRND * BQ + n0, BQ);
        }
        // P^T and dS^T over each query vector's key rows (whole blocks: rows past nk are
        // padding, set to zero, as the products below read whole blocks).
        for (int vv = va; vv < vb; ++vv) {
          const vf lv = vload(lsh + vv * VW), dv8 = vload(ddh + vv * VW);
          const int jh = std::min(tm.jhi[vv], nk);
          for (int j = tm.jlo[vv]; j < jh; ++j) {
            float* sp = w.st + j * BQ + vv * VW;
            float* dp = w.dpt + j * BQ + vv * VW;
            vf x = vload(sp);
            if (!tm.full) x = w.rows.mask(x, j0 + j, vv);
            const vf p = vexp2(x - lv);
            vstore(sp, p);                            // P^T
            vstore(dp, p * (vload(dp) - dv8));        // dS^T
          }
          for (int j = std::max(jh, tm.jlo[vv]); j < tm.jhi[vv]; ++j) {
            vstore(w.st + j * BQ + vv * VW, vf{});
            vstore(w.dpt + j * BQ + vv * VW, vf{});
          }
        }
        // dV += P^T dO ; dK += dS^T Q (per key block, over the queries that see it) ;
        // dQ^T += K^T dS^T (per query vector, over the keys it sees). Softmax scale at the end.
        for (int kb = 0; kb < tm.nb; ++kb) {
          if (tm.a[kb] >= tm.b[kb]) continue;
          const int n0 = tm.a[kb] * VW, nn = (tm.b[kb] - tm.a[kb]) * VW;
          gemm<true>(MRND, DP, nn, w.st + kb * MRND * BQ + n0, BQ, 1, w.dor + hh * tile + n0 * DP,
                     DP, dv_base + (j0 + kb * MRND) * ldc, ldc);
          gemm<true>(MRND, DP, nn, w.dpt + kb * MRND * BQ + n0, BQ, 1, w.qr + hh * tile + n0 * DP,
                     DP, dk_base + (j0 + kb * MRND) * ldc, ldc);
        }
        float* dqh = w.dqt + hh * tile;
        if (tm.uniform) {
          const int jl = tm.jlo[va], jh = tm.jhi[va];
          gemm<true>(DP, (vb - va) * VW, jh - jl, w.kp + jl * DP, 1, DP, w.dpt + jl * BQ + va * VW, BQ,
                     dqh + va * VW, BQ);
        } else {
          for (int vv = va; vv < vb; ++vv) {
            const int jl = tm.jlo[vv], jh = tm.jhi[vv];
            gemm<true>(DP, VW, jh - jl, w.kp + jl * DP, 1, DP, w.dpt + jl * BQ + vv * VW, BQ,
                       dqh + vv * VW, BQ);
          }
        }
      }
    }
    for (int hh = 0; hh < group; ++hh) {
      const int64_t h = g * group + hh;
      const float* dqh = w.dqt + hh * tile;
      for (int r = 0; r < nq; ++r) {
        T* dst = dq + ((b * s.Sq + i0 + r) * s.H + h) * s.D;
        for (int c = 0; c < D; ++c) from_f32(dqh[c * BQ + r] * s.scale, dst + c);
      }
    }
  };

  const int64_t groups = s.B * s.KV;
  if (nt == 1 || groups % nt == 0 || groups >= 4 * nt) {
    // Enough (batch, kv head) pairs to share out evenly: each task owns the dK/dV of one pair
    // (every query head of its group, every query tile), so one parallel region and no sums
    // across threads; a task's order of additions is fixed, so the result does not depend on
    // the thread count either.
    const int64_t kv_elems = (s.S + BK) * s.DP;
#pragma omp parallel num_threads(nt)
    {
      Buf dk_acc(kv_elems), dv_acc(kv_elems);
      Work w(DP, group, tile);
#pragma omp for schedule(static, 1)
      for (int64_t t = 0; t < groups; ++t) {
        const int64_t b = t / s.KV, g = t % s.KV;
        std::memset(dk_acc.p, 0, sizeof(float) * kv_elems);
        std::memset(dv_acc.p, 0, sizeof(float) * kv_elems);
        for (int64_t qb = nqb - 1; qb >= 0; --qb) query_tile(w, b, g, qb, dk_acc.p, dv_acc.p, s.DP);
        for (int64_t j = 0; j < s.S; ++j) {
          const int64_t out = ((b * s.S + j) * s.KV + g) * s.D;
          for (int c = 0; c < D; ++c) {
            from_f32(dk_acc.p[j * s.DP + c] * s.scale, dk + out + c);
            from_f32(dv_acc.p[j * s.DP + c], dv + out + c);
          }
        }
      }
    }
    return;
  }

  // Few pairs (one long sequence): query tiles are shared out instead, per batch element. dK
  // and dV gather contributions from many query tiles: each thread owns an fp32 copy for one
  // batch element at a time (batch elements never share keys), zeroed before each.
  const int64_t ntasks = s.KV * nqb;  // per batch element
  const int64_t kv_elems = (s.S + BK) * s.KV * s.DP;  // one thread's dK (or dV) accumulator
  std::vector<float*> accs(static_cast<size_t>(nt) * 2, nullptr);
  for (int64_t b = 0; b < s.B; ++b)
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    Buf dk_acc(kv_elems), dv_acc(kv_elems);  // zeroed
    accs[2 * tid] = dk_acc.p;
    accs[2 * tid + 1] = dv_acc.p;
    Work w(DP, group, tile);
    // Static round-robin: each thread sees the same tasks in the same order on every run, so the
    // fp32 sums into its accumulator (and the gradients) are bit-for-bit reproducible.
#pragma omp for schedule(static, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t qb = nqb - 1 - t % nqb, g = t / nqb;
      query_tile(w, b, g, qb, dk_acc.p + g * s.DP, dv_acc.p + g * s.DP, s.KV * s.DP);
    }
    // (the implicit barrier above: every thread's accumulator is complete and still alive)
    // Sum the per-thread accumulators into this batch element's dk/dv, row by row.
    const int team = omp_get_num_threads();
    const int64_t rows = s.S * s.KV;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t out_row = b * rows + row;
      for (int c = 0; c < D; ++c) {
        float sk = 0.0f, sv = 0.0f;
        for (int th = 0; th < team; ++th) {
          sk += accs[2 * th][row * s.DP + c];
          sv += accs[2 * th + 1][row * s.DP + c];
        }
        from_f32(sk * s.scale, dk + out_row * s.D + c);
        from_f32(sv, dv + out_row * s.D + c);
      }
    }
  }
}

}  // namespace SC2_NS
