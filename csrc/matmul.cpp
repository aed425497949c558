// The GEMM behind dlk::gemm (gemm.h) and the matmul/linear kernels of dlkernels._C.
//
// BLIS structure: for each NC-wide column block of B and KC-deep slice of K, B is packed into
// NR-column panels (about L3-sized); each MC-row block of A is packed into MR-row panels (L2-sized);
// a register-blocked MR x NR micro-kernel then runs over the packed panels, the B micro-panel
// staying in L1 while the A panels stream from L2. Packing reads any strides, so transposed and
// broadcast operands cost nothing extra, and pads edges with zeros so the micro-kernel always runs
// full tiles (edge tiles are stored through a masked scalar path). Threads each take a block of C
// (see gemm_driver).
#include "gemm.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <vector>

#include "common.h"
#include "simd.h"

namespace dlk {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <class T>
inline T relu_keep_nan(T x) {
  return x < T(0) ? T(0) : x;
}

// The bias element of C's (i, j): one per column (bias_dim 1) or per row (bias_dim 0); nullptr without one.
template <class T>
inline const T* bias_at(const T* bias, int bias_dim, int64_t i, int64_t j) {
  return bias ? (bias_dim == 1 ? bias + j : bias + i) : nullptr;
}

// One element of C through the epilogue, outside the micro-kernel (edges, skinny and summed products).
template <class T>
inline void store_one(T x, T* c, bool accumulate, const T* bias, bool relu) {
  if (accumulate) x += *c;
  if (bias) x += *bias;
  *c = relu ? relu_keep_nan(x) : x;
}

// What storing a C tile does besides writing the product.
template <class T>
struct Epilogue {
  bool load;           // add C's current value (accumulate, or any K block after the first)
  const T* bias_row;   // the bias of the tile's first row (bias_dim = 0, last K block), or nullptr
  const T* bias_col;   // the bias of the tile's first column (bias_dim = 1, last K block), or nullptr
  bool relu;           // last K block only
  bool stream;         // full tiles with non-temporal stores (see gemm_streams_c), never with load
};

// Stores the top-left mv x nv corner of a computed tile (row stride ldt) into C through the
// epilogue: the path of edge tiles and of the portable kernel. Same operation order as the SIMD
// store, so a tile's values do not depend on whether it was an edge tile.
template <class T>
inline void store_tile(const T* tile, int64_t ldt, int mv, int nv, T* c, int64_t ldc, const Epilogue<T>& e) {
  for (int r = 0; r < mv; ++r) {
    T* cr = c + r * ldc;
    const T* tr = tile + r * ldt;
    for (int j = 0; j < nv; ++j) {
      T x = tr[j];
      if (e.load) x += cr[j];
      if (e.bias_col) x += e.bias_col[j];
      if (e.bias_row) x += e.bias_row[r];
      if (e.relu) x = relu_keep_nan(x);
      cr[j] = x;
    }
  }
}

// Portable micro-kernel: plain C++, compiled on every target.
template <class T>
struct PortableKernel {
  static constexpr int MR = 4;
  static constexpr int NR = 8;
  // DIRECT: A read in place, row r at a + r * lda (see macro_kernel); else a packed panel.
  template <bool DIRECT = false>
  static void run(int64_t kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc, int mv, int nv,
                  const Epilogue<T>& e, int64_t lda = 0, LinePrefetch* pf = nullptr, int64_t pf_lines = 0) {
    if (pf) pf->step(pf_lines);
    T acc[MR][NR] = {};
    for (int64_t p = 0; p < kc; ++p, a += DIRECT ? 1 : MR, b += NR)
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NR; ++j) acc[r][j] += a[DIRECT ? r * lda : r] * b[j];
    store_tile(&acc[0][0], NR, mv, nv, c, ldc, e);
  }
};

// ---------------------------------------------------------------------------------------------
// SIMD micro-kernel, written once over a small vector wrapper
// ---------------------------------------------------------------------------------------------
#ifdef DLK_SIMD_VEC
using simd::HalfVec;
using simd::Vec;

// MR_ rows x NV vectors of C held in registers: 6 x 2 uses 12 accumulators + 2 B vectors + 1
// broadcast of the 16 AVX2 registers (the BLIS Haswell/Zen shape: 6x16 float, 6x8 double); on
// AVX-512 the same shape is 6x32 / 6x16. HALF: one more half vector (HalfVec) of columns after the NV.
template <class T, int MR_, int NV, bool HALF = false>
struct SimdKernel {
  using S = Vec<T>;
  using V = typename S::V;
  using H = std::conditional_t<HALF, HalfVec<T>, S>;  // S itself (unused) without HALF
  static constexpr int MR = MR_;
  static constexpr int NR = NV * S::W + (HALF ? S::W / 2 : 0);

  // DIRECT: A read in place, row r at a + r * lda (see macro_kernel); else a packed panel.
  // A last panel of nv <= (NV - 1) * W valid columns computes only the vectors that hold them: a
  // 1x1 conv of 100 pixels an image (Xception's exit flow, NCHW) is 3 whole 32-float panels and one
  // of 4 columns, which the whole tile computed as 32.
  template <bool DIRECT = false>
  static void run(int64_t kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc, int mv, int nv,
                  const Epilogue<T>& e, int64_t lda = 0, LinePrefetch* pf = nullptr, int64_t pf_lines = 0) {
    if constexpr (HALF) {
      if (nv <= NV * S::W) return tile<DIRECT, NV, false>(kc, a, b, c, ldc, mv, nv, e, lda, pf, pf_lines);
    }
    if constexpr (NV > 1) {
      if (nv <= S::W) return tile<DIRECT, 1, false>(kc, a, b, c, ldc, mv, nv, e, lda, pf, pf_lines);
    }
    if constexpr (NV > 2) {
      if (nv <= 2 * S::W) return tile<DIRECT, 2, false>(kc, a, b, c, ldc, mv, nv, e, lda, pf, pf_lines);
    }
    tile<DIRECT, NV, HALF>(kc, a, b, c, ldc, mv, nv, e, lda, pf, pf_lines);
  }

  // The first NVE of the panel's NV vectors of columns, and its half vector where HE (the packed
  // panel stays NR wide).
  template <bool DIRECT, int NVE, bool HE>
  static DLK_INLINE void tile(int64_t kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc, int mv,
                              int nv, const Epilogue<T>& e, int64_t lda, LinePrefetch* pf, int64_t pf_lines) {
    // C's tile is read (K blocks after the first) and written after the loop: start its lines
    // coming now, behind the FMAs (streamed tiles are not read).
    if (!e.stream)
      for (int r = 0; r < mv; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + nv - 1), _MM_HINT_T0);
      }
    V acc[MR][NVE];
    typename H::V hacc[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NVE; ++v) acc[r][v] = S::zero();
      if constexpr (HE) hacc[r] = H::zero();
    }
    // pf: a share of its lines every kChunk steps of K, so that the prefetches trickle out behind the
    // FMAs (see macro_kernel).
    constexpr int64_t kChunk = 16;
    const int64_t pf_chunk = pf ? LinePrefetch::share_of(pf_lines, ceil_div(kc, kChunk)) : 0;
    for (int64_t p0 = 0; p0 < kc; p0 += kChunk) {
      if (pf) pf->step(pf_chunk);
      const int64_t p1 = std::min(kc, p0 + kChunk);
#pragma GCC unroll 4
      for (int64_t p = p0; p < p1; ++p) {
        V bv[NVE];
#pragma GCC unroll 4
        for (int v = 0; v < NVE; ++v) bv[v] = S::load(b + v * S::W);
        typename H::V bh;
        if constexpr (HE) bh = H::load(b + NVE * S::W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const T ar = a[DIRECT ? r * lda : r];
          const V av = S::set1(ar);
#pragma GCC unroll 4
          for (int v = 0; v < NVE; ++v) acc[r][v] = S::fma(av, bv[v], acc[r][v]);
          // a broadcast of its own: the 512-bit one's low half (a cast, no instruction) measured slower
          // (Zen4, interleaved: 25088 x 144 @ 144 x 24 1.72 -> 1.89 ms, 100352 x 96 @ 96 x 24 2.55 -> 2.73)
          if constexpr (HE) hacc[r] = H::fma(H::set1(ar), bh, hacc[r]);
        }
        a += DIRECT ? 1 : MR;
        b += NR;
      }
    }
    if (NVE == NV && HE == HALF && mv == MR && nv == NR) {
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        T* cr = c + r * ldc;
#pragma GCC unroll 4
        for (int v = 0; v < NVE; ++v) store_vector<S>(acc[r][v], cr + v * S::W, e, r, v * S::W);
        if constexpr (HE) store_vector<H>(hacc[r], cr + NVE * S::W, e, r, NVE * S::W);
      }
    } else {
      alignas(64) T tile_buf[MR * NR];
      for (int r = 0; r < MR; ++r) {
        for (int v = 0; v < NVE; ++v) S::store(tile_buf + r * NR + v * S::W, acc[r][v]);
        if constexpr (HE) H::store(tile_buf + r * NR + NVE * S::W, hacc[r]);
      }
      store_tile(tile_buf, NR, mv, nv, c, ldc, e);
    }
  }

  // One vector of a full tile's row r, columns j.. of the tile, through the epilogue into cr.
  template <class X>
  static DLK_INLINE void store_vector(typename X::V x, T* cr, const Epilogue<T>& e, int r, int j) {
    if (e.load) x = X::add(x, X::load(cr));
    if (e.bias_col) x = X::add(x, X::load(e.bias_col + j));
    if (e.bias_row) x = X::add(x, X::set1(e.bias_row[r]));
    if (e.relu) x = X::relu(x);
    if (e.stream)
      X::stream(cr, x);
    else
      X::store(cr, x);
  }
};
// On the AVX-512 machine (32 registers) larger tiles measured slower, interleaved, two threads
// (6 x 2 at 84-89 % of the 2-core FMA peak): 45000x128 @ 128x128 3.01 ms against 3.03 (12 x 2),
// 3.28 (14 x 2), 3.50 (8 x 3); 2048^3 37.1 against 40.4, 42.4, 41.1.
template <class T>
using FastKernel = SimdKernel<T, 6, 2>;
// For C of 2W < N <= 3W columns (17-24 floats on AVX2): the 6 x 2-vector tile would compute a
// third of its columns on padding, a 4 x 3-vector tile (12 accumulators + 3 B vectors + 1
// broadcast: the 16 AVX2 registers) none. 25088 x 144 @ 144 x 24 (MobileNetV2's channels-last 1x1
// projection), two threads, AVX2: 1.46 -> 1.15 ms (torch 1.50).
template <class T>
using WideKernel = SimdKernel<T, 4, 3>;
template <class T>
inline bool wide_tile(int64_t N) { return N > 2 * Vec<T>::W && N <= 3 * Vec<T>::W; }
#if defined(__AVX512F__)
// For C of W < N <= 1.5 W columns (17-24 floats): a vector and a half a row, none of it padding,
// where the 6 x 2-vector tile computed a quarter of its columns on padding and stored every tile
// through its edge path (24 of 32 columns). A half-vector FMA costs half a full one's issue slots on
// the Zen4 (two 256-bit units), the same on CPUs with 512-bit units. Two threads, Zen4, A from DRAM,
// interleaved (MobileNetV2's channels-last 1x1 projections): 25088 x 144 @ 144 x 24 1.23 -> 0.94 ms,
// 25088 x 96 @ 96 x 24 0.80 -> 0.61, 100352 x 96 @ 96 x 24 3.25 -> 2.43. 12 rows measured alike.
template <class T>
using HalfKernel = SimdKernel<T, 8, 1, true>;
template <class T>
inline bool half_tile(int64_t N) { return N > Vec<T>::W && 2 * N <= 3 * Vec<T>::W; }
#endif

#else
template <class T>
using FastKernel = PortableKernel<T>;
#endif

// store_tile, in masked vectors where AVX-512 has them (same operation order): the columns of a tile
// across two matrices of a batch (ColRuns), which go out through it every K slice; on 2x2-7x7
// planes most tiles do. 32x2048x4x4 -> 512 NCHW 1x1, two threads: 2.83 -> 2.66 ms, 64x512x5x5 ->
// 512 2.28 -> 2.08.
template <class T>
inline void store_columns(const T* tile, int64_t ldt, int mv, int nv, T* c, int64_t ldc, const Epilogue<T>& e) {
#if defined(__AVX512F__)
  using S = Vec<T>;
  using V = typename S::V;
  for (int r = 0; r < mv; ++r) {
    T* cr = c + r * ldc;
    const T* tr = tile + r * ldt;
    for (int j = 0; j < nv; j += S::W) {
      const int n = std::min(S::W, nv - j);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      V x;
      if constexpr (sizeof(T) == 4) {
        x = _mm512_maskz_loadu_ps(m, tr + j);
        if (e.load) x = S::add(x, _mm512_maskz_loadu_ps(m, cr + j));
        if (e.bias_col) x = S::add(x, _mm512_maskz_loadu_ps(m, e.bias_col + j));
      } else {
        x = _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), tr + j);
        if (e.load) x = S::add(x, _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), cr + j));
        if (e.bias_col) x = S::add(x, _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), e.bias_col + j));
      }
      if (e.bias_row) x = S::add(x, S::set1(e.bias_row[r]));
      if (e.relu) x = S::relu(x);
      if constexpr (sizeof(T) == 4)
        _mm512_mask_storeu_ps(cr + j, m, x);
      else
        _mm512_mask_storeu_pd(cr + j, static_cast<__mmask8>(m), x);
    }
  }
#else
  store_tile(tile, ldt, mv, nv, c, ldc, e);
#endif
}

// Cache blocking. KC: an NR x KC micro-panel of B (16 KiB for 6x16 float) stays in the 32 KiB L1
// beside the streaming A panel. MC: the MC x KC block of A (144 KiB) sits in a 512 KiB+ L2 with
// room for B's panels and C. NC: the KC x NC block of B (4 MiB per thread) stays in L3.
template <class T, class Kern>
struct Blocking {
  static constexpr int64_t KC = 256;
  static constexpr int64_t MC = std::max<int64_t>(Kern::MR, (144 * 1024 / (KC * int64_t(sizeof(T)))) / Kern::MR * Kern::MR);
  static constexpr int64_t NC =
      std::max<int64_t>(Kern::NR, (4 * 1024 * 1024 / (KC * int64_t(sizeof(T)))) / Kern::NR * Kern::NR);
};

// ---------------------------------------------------------------------------------------------
// packing
// ---------------------------------------------------------------------------------------------
// mc x kc block of A -> ceil(mc / MR) panels, each kc steps of MR row values; rows past mc are 0.
template <int MR, class T>
void pack_a(int64_t mc, int64_t kc, const T* a, int64_t rs, int64_t cs, T* out) {
  for (int64_t i = 0; i < mc; i += MR, out += kc * MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, mc - i));
    const T* ai = a + i * rs;
    if (mr == MR && rs == 1) {
      // A column-major (a weight gradient's grad_y^T, any matmul's backward A^T): each K step's MR values
      // are contiguous, one fixed-size copy; the strided loop below, with rs known only at run time, stayed
      // scalar and took a fifth of the GEMM. Two threads, Zen4, interleaved with the previous build:
      // 32 x 15488 @ 15488 x 32 283 -> 250 us, 15488 x 32 @ 32 x 32 259 -> 215, 128 x 45000 @ 45000 x 128
      // 9.9 -> 9.4 ms; square products level.
      for (int64_t p = 0; p < kc; ++p) std::memcpy(out + p * MR, ai + p * cs, MR * sizeof(T));
    } else if (mr == MR) {
      for (int64_t p = 0; p < kc; ++p)
        for (int r = 0; r < MR; ++r) out[p * MR + r] = ai[r * rs + p * cs];
    } else {
      for (int64_t p = 0; p < kc; ++p)
        for (int r = 0; r < MR; ++r) out[p * MR + r] = r < mr ? ai[r * rs + p * cs] : T(0);
    }
  }
}

#ifdef DLK_SIMD_VEC
// dst[p * ld + c] = src[c * cs + p] for a square block of one 256-bit vector's lanes (8 floats, 4
// doubles): each of its columns of B loaded as a vector, transposed in registers.
DLK_INLINE void transpose_block(const float* src, int64_t cs, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src + c * cs);
  for (int c = 0; c < 8; c += 2) t[c] = _mm256_unpacklo_ps(r[c], r[c + 1]), t[c + 1] = _mm256_unpackhi_ps(r[c], r[c + 1]);
  for (int h = 0; h < 8; h += 4) {  // columns h..h + 3: steps 0-3 and 4-7 in the two 128-bit halves
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int p = 0; p < 4; ++p) {
    _mm256_storeu_ps(dst + p * ld, _mm256_permute2f128_ps(r[p], r[p + 4], 0x20));
    _mm256_storeu_ps(dst + (p + 4) * ld, _mm256_permute2f128_ps(r[p], r[p + 4], 0x31));
  }
}
DLK_INLINE void transpose_block(const double* src, int64_t cs, double* dst, int64_t ld) {
  __m256d r[4];
  for (int c = 0; c < 4; ++c) r[c] = _mm256_loadu_pd(src + c * cs);
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + ld, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ld, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ld, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif

// Columns [u, u + seg) of one packed panel (kc steps of NR values) from seg columns of B at bs: rows
// by memcpy where columns are contiguous (NR at a time a fixed-size copy), each column read
// contiguously where B is transposed (rs == 1), square blocks transposed in registers: element by
// element, a transposed weight (a linear layer's, a channels-last 1x1 conv's) cost a scalar store a
// value. Two threads, Zen4, interleaved: 512 x 1024 @ (4096 x 1024)^T 25.8 -> 22.8 ms, 800 x 1024 @
// (1536 x 1024)^T 13.6 -> 12.6, 1024^3 12.0 -> 11.3, 2888 x 728 @ (728 x 728)^T 15.7 -> 15.1; the fused
// separable forward's fixed part (its weight packed) 243 -> 87 us at 728 -> 728, 78 -> 37 at 256 -> 256.
template <int NR, class T>
DLK_INLINE void pack_panel_columns(const T* bs, int64_t rs, int64_t cs, int64_t kc, int u, int seg, T* o) {
  if (cs == 1 && seg == NR) {
    for (int64_t p = 0; p < kc; ++p) std::memcpy(o + p * NR, bs + p * rs, sizeof(T) * NR);
  } else if (cs == 1) {
    for (int64_t p = 0; p < kc; ++p) std::memcpy(o + p * NR + u, bs + p * rs, sizeof(T) * seg);
  } else if (rs == 1) {
    int c = 0;
#ifdef DLK_SIMD_VEC
    constexpr int TB = 32 / sizeof(T);
    for (; c + TB <= seg; c += TB) {
      int64_t p = 0;
      for (; p + TB <= kc; p += TB) transpose_block(bs + c * cs + p, cs, o + p * NR + u + c, NR);
      for (; p < kc; ++p)
        for (int cc = c; cc < c + TB; ++cc) o[p * NR + u + cc] = bs[cc * cs + p];
    }
#endif
    for (; c < seg; ++c)
      for (int64_t p = 0; p < kc; ++p) o[p * NR + u + c] = bs[c * cs + p];
  } else {
    for (int64_t p = 0; p < kc; ++p)
      for (int c = 0; c < seg; ++c) o[p * NR + u + c] = bs[c * cs + p * rs];
  }
}

// Panels [q0, q1) of the kc x nc block of B -> each kc steps of NR column values; columns past nc
// are 0. Panel q lands at out + q * kc * NR. The block's column j is column g0 + j of the whole
// (runs: see ColRuns; b is then column 0's address): a panel across matrices of the batch takes each
// matrix's columns as a run of their own.
template <int NR, class T>
void pack_b(int64_t q0, int64_t q1, int64_t nc, int64_t kc, const T* b, int64_t rs, int64_t cs, T* out,
            const ColRuns& runs = {}, int64_t g0 = 0) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t j = q * NR;
    const int nr = static_cast<int>(std::min<int64_t>(NR, nc - j));
    T* o = out + q * kc * NR;
    for (int u = 0; u < nr;) {
      const int seg = runs.whole(g0 + j + u, nr - u)
                          ? nr - u
                          : static_cast<int>(runs.len - (g0 + j + u) % runs.len);
      pack_panel_columns<NR>(b + runs.at(g0 + j + u, cs), rs, cs, kc, u, seg, o);
      u += seg;
    }
    if (nr < NR)
      for (int64_t p = 0; p < kc; ++p)
        for (int c = nr; c < NR; ++c) o[p * NR + c] = T(0);
  }
}

template <class T>
void gemm_no_k(int64_t M, int64_t N, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool accumulate) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) store_one(T(0), C + i * ldc + j, accumulate, bias_at(bias, bias_dim, i, j), relu);
}

// ---------------------------------------------------------------------------------------------
// skinny products (M <= 4, or N <= 4 by transposition): memory-bound, so no packing (which would
// read B twice and, in MR x NR tiles, waste most FMAs on zero padding)
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSkinny = 4;

// sum_k a[k * sa] * b[k * sb] in 16 independent lanes: vectorizes without reassociating, and is a
// blocked sum (each lane adds K / 16 products).
template <class T>
inline T dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t K) {
  constexpr int L = 16;
  T lane[L] = {};
  int64_t k = 0;
  if (sa == 1 && sb == 1) {
    for (; k + L <= K; k += L)
      for (int u = 0; u < L; ++u) lane[u] += a[k + u] * b[k + u];
  } else {
    for (; k + L <= K; k += L)
      for (int u = 0; u < L; ++u) lane[u] += a[(k + u) * sa] * b[(k + u) * sb];
  }
  for (; k < K; ++k) lane[k % L] += a[k * sa] * b[k * sb];
  for (int w = L / 2; w > 0; w /= 2)
    for (int u = 0; u < w; ++u) lane[u] += lane[u + w];
  return lane[0];
}

// C (M x N, element (i, j) at C[i * rs_c + j * cs_c]) for M <= kSkinny.
template <class T>
void gemm_skinny(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                 int64_t cs_b, T* C, int64_t rs_c, int64_t cs_c, const T* bias, int bias_dim, bool relu,
                 bool accumulate, bool parallel) {
  const bool par = parallel && M * N * K >= kMinParallelMacs && omp_get_max_threads() > 1;
  if (cs_b == 1) {
    // rows of B are contiguous: C's rows += A[i, k] * B[k, :], one L1-sized chunk of columns at a
    // time, each row of B read once for all M rows of C
    constexpr int64_t NJ = 4096 / sizeof(T);
    const int64_t chunks = ceil_div(N, NJ);
    auto chunk = [&](int64_t c) {
      const int64_t j0 = c * NJ, nj = std::min(NJ, N - j0);
      alignas(64) T acc[kSkinny][NJ];
      for (int64_t i = 0; i < M; ++i) std::fill(acc[i], acc[i] + nj, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* bk = B + k * rs_b + j0;
        for (int64_t i = 0; i < M; ++i) {
          const T a = A[i * rs_a + k * cs_a];
          T* ai = acc[i];
          for (int64_t j = 0; j < nj; ++j) ai[j] += a * bk[j];
        }
      }
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < nj; ++j)
          store_one(acc[i][j], C + i * rs_c + (j0 + j) * cs_c, accumulate, bias_at(bias, bias_dim, i, j0 + j), relu);
    };
    if (par) {
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) chunk(c);
    } else {
      for (int64_t c = 0; c < chunks; ++c) chunk(c);
    }
  } else {
    // columns of B (the usual case: a transposed weight) are dot products with A's rows
    auto column = [&](int64_t j) {
      for (int64_t i = 0; i < M; ++i)
        store_one(dot(A + i * rs_a, cs_a, B + j * cs_b, rs_b, K), C + i * rs_c + j * cs_c, accumulate,
                  bias_at(bias, bias_dim, i, j), relu);
    };
    if (par) {
#pragma omp parallel for schedule(static)
      for (int64_t j = 0; j < N; ++j) column(j);
    } else {
      for (int64_t j = 0; j < N; ++j) column(j);
    }
  }
}

// Packing-buffer sizes (elements) of one thread working on an at most M x N x K problem.
template <class T, class Kern>
struct Buffers {
  int64_t kc, a_size, b_size;
  Buffers(int64_t M, int64_t N, int64_t K) {
    using Blk = Blocking<T, Kern>;
    kc = ceil_div(K, ceil_div(K, Blk::KC));  // K in equal slices: 300 is 2 x 150, not 256 + 44
    a_size = round_up(std::min(Blk::MC, round_up(M, Kern::MR)) * kc, 16);
    b_size = round_up(std::min(Blk::NC, round_up(N, Kern::NR)) * kc, 16);
  }
};

// The mc x nc block of C at c from packed A panels (ceil(mc / MR) of kc x MR) and packed B panels
// (ceil(nc / NR) of kc x NR): each B micro-panel stays in L1 while every A panel streams past it.
// bias_row / bias_col: the block's first row / column bias, or nullptr.
// lda > 0: A is not packed but read in place, row i at a + i * lda with unit stride along K
// (gemm_serial's choice for one or two B panels); a partial last MR-row tile is packed into a_tail
// (MR * kc values), which pads it with zeros.
// runs / g0: the block's column j is column g0 + j of a batch's columns (ColRuns; c is then
// column 0's address, and bias_col must be nullptr). A tile across two matrices is computed into a
// local tile and copied out.
// pf: lines to fetch while the block computes, an equal share per micro-tile, which the micro-kernel
// spreads over its K loop (gemm_serial's next rows of A, the fused separable's next task's input).
// Issued all at once before each tile, the prefetches held the miss buffers the tile's own loads
// waited on: two threads, Zen4, interleaved, inputs from DRAM, spread against at once (ms):
// 25088 x 144 @ 144 x 24 0.88-1.12 against 0.97-1.19, 25088 x 576 @ 576 x 96 13.99-14.47 against
// 14.44-14.91, 45000 x 128 @ 128 x 128 6.91-7.10 against 7.19-7.26, 32 x 2048 @ 2048 x 1000 (the
// swapped order: the weight's rows are the A read in place) 0.74-0.77 against 0.76-0.82 (0.73-0.83
// without any prefetch); the fused separable forward, channels-last, 8x144x56x56 k3 -> 24 1.74 ->
// 1.60, k5 2.29 -> 2.10, 8x256x38x38 s2 -> 256 2.49 -> 2.36, 8x728x19x19 the same.
template <class T, class Kern>
inline void macro_kernel(int64_t mc, int64_t nc, int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool load,
                         const T* bias_row, const T* bias_col, bool relu, bool stream, int64_t lda = 0,
                         T* a_tail = nullptr, LinePrefetch* pf = nullptr, const ColRuns& runs = {},
                         int64_t g0 = 0) {
  constexpr int MR = Kern::MR, NR = Kern::NR;
  const int64_t pf_step = pf ? pf->share(ceil_div(nc, NR) * ceil_div(mc, MR)) : 0;
  for (int64_t q = 0, j = 0; j < nc; ++q, j += NR) {
    const int nv = static_cast<int>(std::min<int64_t>(NR, nc - j));
    const bool whole = runs.whole(g0 + j, nv);
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const int mv = static_cast<int>(std::min<int64_t>(MR, mc - ir));
      Epilogue<T> e;
      e.load = load;
      e.bias_row = bias_row ? bias_row + ir : nullptr;
      e.bias_col = bias_col ? bias_col + j : nullptr;
      e.relu = relu;
      e.stream = stream && !load && whole;
      const T* bq = b + q * kc * NR;
      auto run = [&](T* cij, int64_t ld) {
        if (lda == 0) {
          Kern::run(kc, a + ir * kc, bq, cij, ld, mv, nv, e, 0, pf, pf_step);
        } else if (mv == MR) {
          Kern::template run<true>(kc, a + ir * lda, bq, cij, ld, mv, nv, e, lda, pf, pf_step);
        } else {
          pack_a<MR>(mv, kc, a + ir * lda, lda, 1, a_tail);
          Kern::run(kc, a_tail, bq, cij, ld, mv, nv, e, 0, pf, pf_step);
        }
      };
      T* ci = c + ir * ldc;
      if (whole) {
        run(ci + runs.at(g0 + j), ldc);
        continue;
      }
      // the bare product into a local tile, then each matrix's columns through the epilogue
      alignas(64) T tile[MR * NR];
      const Epilogue<T> full = e;
      e = Epilogue<T>{false, nullptr, nullptr, false, false};
      run(tile, NR);
      for (int u = 0; u < nv;) {
        const int seg = static_cast<int>(std::min<int64_t>(nv - u, runs.len - (g0 + j + u) % runs.len));
        store_columns(tile + u, NR, mv, seg, ci + runs.at(g0 + j + u), ldc, full);
        u += seg;
      }
    }
  }
}

// The BLIS loops on the calling thread, with the caller's packing buffers. Columns g0 .. g0 + N - 1
// of B and C (with runs: of a batch's, B and C then column 0's addresses; bias_dim 0 only).
template <class T, class Kern>
void gemm_serial(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                 int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool accumulate,
                 bool stream, int64_t kc_max, T* a_buf, T* b_buf, const ColRuns& runs_b = {},
                 const ColRuns& runs_c = {}, int64_t g0 = 0) {
  constexpr int MR = Kern::MR, NR = Kern::NR;
  using Blk = Blocking<T, Kern>;
  const int64_t nc_max = std::min(Blk::NC, round_up(N, NR));
  // equal MC blocks, each a multiple of MR
  const int64_t mc_max = round_up(ceil_div(M, ceil_div(M, Blk::MC)), MR);
  for (int64_t jc = 0; jc < N; jc += nc_max) {
    const int64_t nc = std::min(nc_max, N - jc);
    const int64_t np = ceil_div(nc, NR);
    for (int64_t pc = 0; pc < K; pc += kc_max) {
      const int64_t kc = std::min(kc_max, K - pc);
      const bool first = pc == 0, last = pc + kc >= K;
      pack_b<NR>(0, np, nc, kc, B + pc * rs_b, rs_b, cs_b, b_buf, runs_b, g0 + jc);
      // With one or two B panels, packing A (a transposing copy, about two instructions an element)
      // cost as much as the 2 * NR / W FMAs each element feeds: read rows of A in place instead
      // when they are contiguous along K (gemm_a_in_place). 25088 x 144 @ 144 x {16, 24,
      // 32} (MobileNetV2's 1x1 projections, channels-last), two threads: 1.39 / 2.02 / 2.03 ms
      // packed, 1.20 / 1.39 / 1.37 in place (torch 0.94 / 1.50 / 1.56).
      // Not a broadcast A (rs_a == 0: an expanded row, e.g. a gradient expanded from a vector):
      // macro_kernel takes lda == 0 for "packed", and read that row as MR x kc packed values, past its end.
      const bool direct = gemm_a_in_place(nc, NR) && cs_a == 1 && rs_a > 0;
      for (int64_t i0 = 0; i0 < M; i0 += mc_max) {
        const int64_t mc = std::min(mc_max, M - i0);
        const T* ai = A + i0 * rs_a + pc * cs_a;
        if (!direct) pack_a<MR>(mc, kc, ai, rs_a, cs_a, a_buf);
        // Read in place, A's next block comes from DRAM row by row of tiles: MR short runs at a time
        // (kc elements of MR rows), which the hardware prefetchers barely start on before the tile
        // moves on, so the FMAs waited on DRAM and DRAM on the FMAs. Its lines are fetched while this
        // block computes (macro_kernel's pf). Two threads, Zen4, A from DRAM, interleaved (ms):
        // 25088 x 144 @ 144 x 24 1.92 -> 0.94, 25088 x 384 @ 384 x 64 8.27 -> 6.50, 25088 x 576 @ 576
        // x 96 16.8 -> 14.6, 45000 x 128 @ 128 x 128 7.91 -> 6.81; 2888 x 728 @ 728 x 728, 800 x 1024
        // @ 1024 x 1536, 512 x 1024 @ 1024 x 4096, 2048^3 and the swapped 32 x 2048 @ 2048 x 1000
        // within 2 %.
        // In the last block of a K slice, the next slice of B is fetched instead, where it is at most
        // about an L2 (kNextSliceBytes): pack_b otherwise reads it from DRAM while no FMA runs, which
        // in a weight gradient (few rows of C, K every pixel of the batch: a slice a block) was a
        // third of the time. Two threads, Zen4, interleaved (ms): 24 x 25088 @ 25088 x 144 (MobileNetV2's
        // channels-last 1x1 weight gradient) 1.78 -> 1.23, 24 x 100352 @ 100352 x 96 4.40 -> 3.19, 128 x
        // 45000 @ 45000 x 128 9.58 -> 8.72, 256 x 11552 @ 11552 x 256 8.21 -> 7.88, 728 x 2888 @ 2888 x 728
        // 15.5 -> 15.0 (a 745 KiB slice, which a limit of 256 KiB left out: 15.5).
        LinePrefetch next;
        constexpr int64_t kNextSliceBytes = 1 << 20;
        if (direct && i0 + mc < M) {
          next = LinePrefetch(ai + mc * rs_a, kc, std::min(mc_max, M - i0 - mc), rs_a);
        } else if (i0 + mc >= M && !last && runs_b.len == 0 &&
                   nc * kc_max * static_cast<int64_t>(sizeof(T)) <= kNextSliceBytes) {
          const int64_t kn = std::min(kc_max, K - pc - kc);
          const T* bn = B + (pc + kc) * rs_b + (g0 + jc) * cs_b;
          if (cs_b == 1)
            next = LinePrefetch(bn, nc, kn, rs_b);
          else if (rs_b == 1)
            next = LinePrefetch(bn, kn, nc, cs_b);
        }
        macro_kernel<T, Kern>(mc, nc, kc, direct ? ai : a_buf, b_buf, C + i0 * ldc, ldc, accumulate || !first,
                              (last && bias && bias_dim == 0) ? bias + i0 : nullptr,
                              (last && bias && bias_dim == 1) ? bias + jc : nullptr, last && relu, stream,
                              direct ? rs_a : 0, a_buf, next.count() ? &next : nullptr, runs_c, g0 + jc);
      }
    }
  }
  if (stream) stream_fence();
}

// Whether full C tiles go out with non-temporal stores: C written once (one K slice, nothing to
// accumulate), too large to stay in cache (streams_outputs), and every tile row whole 64-byte
// lines (tile widths NR a multiple of a line, C and its rows line-aligned). A plain store reads
// each line first. Two threads, interleaved A/B: 25088 x 24 @ 24 x {96, 144} (MobileNetV2's
// channels-last pointwise input gradients) 1.08 -> 0.93 and 1.57 -> 1.35 ms (torch 0.92, 1.53);
// 45000 x 128 @ 128 x 128 (Xception entry) 10.4 -> 9.8 ms (torch 10.1). With runs, each run whole
// tiles (len a multiple of NR) and each matrix line-aligned.
template <class T, class Kern>
bool gemm_streams_c(int64_t M, int64_t N, int64_t K, const T* C, int64_t ldc, bool accumulate, int64_t kc,
                    const ColRuns& runs_c) {
#ifdef DLK_SIMD_VEC
  constexpr int64_t line = 64, esz = sizeof(T);
  return !accumulate && K <= kc && (Kern::NR * esz) % line == 0 && (ldc * esz) % line == 0 &&
         reinterpret_cast<uintptr_t>(C) % line == 0 && runs_c.len % Kern::NR == 0 &&
         (runs_c.stride * esz) % line == 0 && streams_outputs((M * K + K * N + M * N) * esz);
#else
  (void)M, (void)N, (void)K, (void)C, (void)ldc, (void)accumulate, (void)kc, (void)runs_c;
  return false;
#endif
}

// Split K across the threads where C is small and K long (a weight gradient, whose K is every
// pixel of the batch): a grid of C blocks would have each thread pack a whole operand that the
// others pack too, and the packing costs as much as the FMAs when M or N is a few dozen. Each
// thread computes a private C over its part of K; the partial Cs are then added with the epilogue.
// Two threads: 24 x 144 over K = 25088 (the channels-last pointwise weight gradient of MobileNetV2)
// 2.90 -> 1.95 ms (torch 2.15); 24 x 96 over K = 25088 1.58 -> 1.32 ms (torch 1.49).
inline bool gemm_splits_k(int64_t M, int64_t N, int64_t K, int64_t kc) {
  return M * N <= 64 * 1024 && K >= 8 * std::max(M, N) && K >= 4 * kc;
}

template <class T, class Kern>
void gemm_split_k(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                  int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool accumulate, int nt,
                  const Buffers<T, Kern>& buf, T* scratch_all) {
  std::vector<T> part(static_cast<size_t>(nt * M * N));
  int used = 1;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
#pragma omp single
    used = team;
    // whole KC slices per thread, so no thread's last slice is a sliver
    const int64_t slices = ceil_div(K, buf.kc);
    const int64_t k0 = std::min(K, slices * tid / team * buf.kc), k1 = std::min(K, slices * (tid + 1) / team * buf.kc);
    T* const mine = scratch_all + tid * (buf.a_size + buf.b_size);
    T* const pc = part.data() + tid * M * N;
    if (k1 > k0)
      gemm_serial<T, Kern>(M, N, k1 - k0, A + k0 * cs_a, rs_a, cs_a, B + k0 * rs_b, rs_b, cs_b, pc, N, nullptr, 0,
                           false, false, false, buf.kc, mine, mine + buf.a_size);
    else
      std::fill(pc, pc + M * N, T(0));
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T x = 0;
      for (int t = 0; t < used; ++t) x += part[(t * M + i) * N + j];
      store_one(x, C + i * ldc + j, accumulate, bias_at(bias, bias_dim, i, j), relu);
    }
}

// A few rows of C against many columns of a B whose columns are contiguous along K (a linear
// layer's weight.t() at a small batch, a late conv layer's GEMM over few pixels): computed as
// C^T = B^T A^T, whose A (B^T, the large operand) the micro-kernel reads in place and whose B (A^T,
// a few columns) packs small, where the plain order packs all of B for a few row tiles (32 rows: 5
// full 6-row tiles and a third of one). C^T goes to a scratch buffer and is transposed into C, the
// epilogue fused into the swapped GEMM unless C accumulates; K >= M keeps that copy small beside
// the product. Two threads, a @ w.t(), interleaved with the plain order or in alternating runs:
// 32 x 4608 @ 4608 x 512 1.79 -> 0.89 ms (torch 1.23), 8 x 4096 @ 4096 x 1024 2.06 -> 0.85 (1.49),
// 64 x 1024 @ 1024 x 1024 0.94 -> 0.73 (0.94), 128 x 1024 @ 1024 x 1024 1.54 -> 1.34; 256 rows
// 2.72-3.03 -> 2.82-3.10 and 128 x 64 @ 64 x 4096 0.40 -> 0.91 (the copy) are left plain.
template <class Kern>
inline bool gemm_swaps(int64_t M, int64_t N, int64_t K, int64_t rs_b) {
  return rs_b == 1 && M <= 128 && N >= 2 * M && K >= M && gemm_a_in_place(M, Kern::NR);
}

template <class T, class Kern>
void gemm_driver(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                 int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool parallel,
                 bool accumulate, const ColRuns& runs_b = {}, const ColRuns& runs_c = {});

template <class T, class Kern>
void gemm_swapped(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                  int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool parallel,
                  bool accumulate) {
  T* const ct = thread_buffer<struct GemmSwapped, T>(static_cast<size_t>(M * N));  // (N, M) row-major
  const bool fused = !accumulate;
  gemm_driver<T, Kern>(N, M, K, B, cs_b, rs_b, A, cs_a, rs_a, ct, M, fused ? bias : nullptr, 1 - bias_dim,
                       fused && relu, parallel, false);
  constexpr int64_t JB = 64;  // C^T rows per block: a block of (JB, M) stays in L1
  for (int64_t j0 = 0; j0 < N; j0 += JB) {
    const int64_t j1 = std::min(N, j0 + JB);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = j0; j < j1; ++j)
        store_one(ct[j * M + i], C + i * ldc + j, accumulate, fused ? nullptr : bias_at(bias, bias_dim, i, j),
                  !fused && relu);
  }
}

// Threads: C is cut into a tm x tn grid of blocks (whole MR-row / NR-column panels, balanced to
// one panel) and each thread runs the serial GEMM on its block with its own packing buffers. No
// barrier anywhere, so a thread the OS delays (shared or oversubscribed cores) holds up nobody
// until the end; the price, re-packing B tm times and A tn times, is O(K(M + N)) against the
// O(MNK / threads) arithmetic.
template <class T, class Kern>
void gemm_driver(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
                 int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool parallel,
                 bool accumulate, const ColRuns& runs_b, const ColRuns& runs_c) {
  constexpr int MR = Kern::MR, NR = Kern::NR;
  if (M <= 0 || N <= 0) return;
  if (runs_c.len && (K <= 0 || M <= kSkinny || N <= kSkinny || (bias && bias_dim == 1) ||
                     gemm_splits_k(M, N, K, Buffers<T, Kern>(M, N, K).kc))) {
    // the paths below that take plain columns only: one matrix at a time
    for (int64_t g = 0; g < N; g += runs_c.len)
      gemm_driver<T, Kern>(M, runs_c.len, K, A, rs_a, cs_a, B + runs_b.at(g, cs_b), rs_b, cs_b, C + runs_c.at(g), ldc,
                           bias, bias_dim, relu, parallel, accumulate);
    return;
  }
  if (K <= 0) return gemm_no_k(M, N, C, ldc, bias, bias_dim, relu, accumulate);
  if (M <= kSkinny)
    return gemm_skinny(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, 1, bias, bias_dim, relu, accumulate,
                       parallel);
  if (N <= kSkinny)  // C^T = B^T A^T, bias dims swapped
    return gemm_skinny(N, M, K, B, cs_b, rs_b, A, cs_a, rs_a, C, 1, ldc, bias, 1 - bias_dim, relu, accumulate,
                       parallel);

  if (runs_b.len == 0 && runs_c.len == 0 && gemm_swaps<Kern>(M, N, K, rs_b))
    return gemm_swapped<T, Kern>(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, bias, bias_dim, relu, parallel,
                                 accumulate);

  int nt = 1;
  if (parallel && M * N * K >= kMinParallelMacs) nt = std::max(1, omp_get_max_threads());
  // Sized for the whole problem, so any team size (the runtime may give fewer threads) fits;
  // only the pages a thread's block touches are ever faulted in.
  const Buffers<T, Kern> buf(M, N, K);
  const int64_t per_thread = buf.a_size + buf.b_size;
  T* const scratch_all = thread_buffer<struct GemmPacking, T>(static_cast<size_t>(per_thread * nt));
  const bool stream = gemm_streams_c<T, Kern>(M, N, K, C, ldc, accumulate, buf.kc, runs_c);
  if (nt == 1)
    return gemm_serial<T, Kern>(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, bias, bias_dim, relu, accumulate,
                                stream, buf.kc, scratch_all, scratch_all + buf.a_size, runs_b, runs_c);

  if (gemm_splits_k(M, N, K, buf.kc))
    return gemm_split_k<T, Kern>(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, bias, bias_dim, relu, accumulate,
                                 nt, buf, scratch_all);

  const int64_t mp = ceil_div(M, MR), np = ceil_div(N, NR);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    // Of the grids whose busiest thread has at most 5 % more tiles than the fewest, the one that
    // reads the fewest elements (every thread reads its rows of A and packs its columns of B: K *
    // (M * tn + N * tm)); on ties the fewest tiles, then an M split (A is the operand re-read per
    // column block). A weight gradient of 24 x 96 over K = 25088 split its 24 rows and packed all of
    // B twice: 1.83 ms, torch 1.43. The 5 %: 96 x 576 @ 576 x 1568 (8 NCHW images of 14x14 as one
    // product) took the M split for 2 % fewer tiles, both threads packing all of B: 0.66 -> 0.53 ms
    // (eager 0.55), 112 x 672 @ 672 x 392 0.23 -> 0.21 (0.22).
    int tm = 1;
    int64_t fewest = -1;
    for (int d = team; d >= 1; --d)
      if (team % d == 0) {
        const int64_t tiles = ceil_div(mp, d) * ceil_div(np, team / d);
        fewest = fewest < 0 ? tiles : std::min(fewest, tiles);
      }
    int64_t best_tiles = -1, best_pack = -1;
    for (int d = team; d >= 1; --d) {
      if (team % d) continue;
      const int64_t tiles = ceil_div(mp, d) * ceil_div(np, team / d), pack = M * (team / d) + N * d;
      if (tiles * 20 > fewest * 21) continue;
      if (best_pack < 0 || pack < best_pack || (pack == best_pack && tiles < best_tiles))
        best_pack = pack, best_tiles = tiles, tm = d;
    }
    const int tn = team / tm, ti = tid / tn, tj = tid % tn;
    const int64_t m0 = std::min(M, mp * ti / tm * MR), m1 = std::min(M, mp * (ti + 1) / tm * MR);
    const int64_t n0 = std::min(N, np * tj / tn * NR), n1 = std::min(N, np * (tj + 1) / tn * NR);
    if (m1 > m0 && n1 > n0) {
      T* const mine = scratch_all + tid * per_thread;
      const T* bias_blk = bias ? bias + (bias_dim == 1 ? n0 : m0) : nullptr;
      gemm_serial<T, Kern>(m1 - m0, n1 - n0, K, A + m0 * rs_a, rs_a, cs_a, B, rs_b, cs_b, C + m0 * ldc, ldc,
                           bias_blk, bias_dim, relu, accumulate, stream, buf.kc, mine, mine + buf.a_size, runs_b,
                           runs_c, n0);
    }
  }
}

}  // namespace

namespace {
template <class T, class Kern>
GemmBlocking blocking_of() {
  using Blk = Blocking<T, Kern>;
  return {Kern::MR, Kern::NR, Blk::KC, Blk::MC};
}

// f(Kern{}) for the micro-kernel whose tile bl names (gemm_blocking made it).
template <class T, class F>
void with_kernel(const GemmBlocking& bl, F&& f) {
#ifdef DLK_SIMD_VEC
  if (bl.mr == WideKernel<T>::MR && bl.nr == WideKernel<T>::NR) return f(WideKernel<T>{});
#endif
#if defined(__AVX512F__)
  if (bl.mr == HalfKernel<T>::MR && bl.nr == HalfKernel<T>::NR) return f(HalfKernel<T>{});
#endif
  f(FastKernel<T>{});
}
}  // namespace

template <class T>
GemmBlocking gemm_blocking(int64_t n) {
#ifdef DLK_SIMD_VEC
  if (wide_tile<T>(n)) return blocking_of<T, WideKernel<T>>();
#endif
#if defined(__AVX512F__)
  if (half_tile<T>(n)) return blocking_of<T, HalfKernel<T>>();
#endif
  (void)n;
  return blocking_of<T, FastKernel<T>>();
}

template <class T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B, int64_t rs_b,
          int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu, bool parallel, bool accumulate) {
  with_kernel<T>(gemm_blocking<T>(N), [&](auto kern) {
    gemm_driver<T, decltype(kern)>(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, bias, bias_dim, relu, parallel,
                                   accumulate);
  });
}

template <class T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B,
                   int64_t rs_b, int64_t cs_b, T* C, int64_t ldc, const T* bias, int bias_dim, bool relu,
                   bool parallel, bool accumulate) {
  gemm_driver<T, PortableKernel<T>>(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, ldc, bias, bias_dim, relu, parallel,
                                    accumulate);
}

template <class T>
void gemm_pack_a(const GemmBlocking& bl, int64_t mc, int64_t kc, const T* a, int64_t rs, int64_t cs, T* out) {
  with_kernel<T>(bl, [&](auto kern) { pack_a<decltype(kern)::MR>(mc, kc, a, rs, cs, out); });
}

template <class T>
void gemm_pack_b(const GemmBlocking& bl, int64_t nc, int64_t kc, const T* b, int64_t rs, int64_t cs, T* out) {
  with_kernel<T>(bl, [&](auto kern) {
    constexpr int NR = decltype(kern)::NR;
    pack_b<NR>(0, ceil_div(nc, NR), nc, kc, b, rs, cs, out);
  });
}

template <class T>
void gemm_macro(const GemmBlocking& bl, int64_t mc, int64_t nc, int64_t kc, const T* a, const T* b_packed, T* c,
                int64_t ldc, bool load, const T* bias_row, const T* bias_col, int64_t lda, T* a_tail,
                LinePrefetch* pf) {
  if (mc > 0 && nc > 0)
    with_kernel<T>(bl, [&](auto kern) {
      macro_kernel<T, decltype(kern)>(mc, nc, kc, a, b_packed, c, ldc, load, bias_row, bias_col, false, false, lda, a_tail,
                                      pf);
    });
}

#define DLK_GEMM_BLOCKS(T)                                                                                      \
  template GemmBlocking gemm_blocking<T>(int64_t);                                                              \
  template void gemm_pack_a<T>(const GemmBlocking&, int64_t, int64_t, const T*, int64_t, int64_t, T*);          \
  template void gemm_pack_b<T>(const GemmBlocking&, int64_t, int64_t, const T*, int64_t, int64_t, T*);          \
  template void gemm_macro<T>(const GemmBlocking&, int64_t, int64_t, int64_t, const T*, const T*, T*, int64_t,  \
                              bool, const T*, const T*, int64_t, T*, LinePrefetch*);
DLK_GEMM_BLOCKS(float)
DLK_GEMM_BLOCKS(double)
#undef DLK_GEMM_BLOCKS

template void gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                          float*, int64_t, const float*, int, bool, bool, bool);
template void gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                           int64_t, double*, int64_t, const double*, int, bool, bool, bool);
template void gemm_portable<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                                   int64_t, float*, int64_t, const float*, int, bool, bool, bool);
template void gemm_portable<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*,
                                    int64_t, int64_t, double*, int64_t, const double*, int, bool, bool, bool);

// ---------------------------------------------------------------------------------------------
// batched matmul and the linear epilogue's backward, for dlkernels/matmul/cpp_impl.py
// ---------------------------------------------------------------------------------------------
namespace {

// Small matrices in a batch go one per thread (no team inside each GEMM); large ones use the
// team inside each GEMM, whose threads then share the operands' cache lines in L3 and split
// evenly however many matrices there are.
constexpr int64_t kMaxMacsPerThreadGemm = 256 * 256 * 256;

template <class T>
void mm_batched(int64_t batch, int64_t M, int64_t N, int64_t K, const T* A, int64_t sb_a, int64_t rs_a, int64_t cs_a,
                const T* B, int64_t sb_b, int64_t rs_b, int64_t cs_b, T* C, const T* bias, int bias_dim, bool relu,
                bool portable, bool accumulate) {
  auto* g = portable ? &gemm_portable<T> : &gemm<T>;
  const int nt = omp_get_max_threads();
  const int64_t macs = M * N * std::max<int64_t>(K, 1);
  // one matrix per thread when that splits evenly enough (3 matrices on 2 threads would leave
  // one thread idle a third of the time) or when a single matrix is too small for a team
  const bool balanced = batch % nt == 0 || batch >= 4 * nt || macs < kMinParallelMacs;
  const bool by_batch = nt > 1 && batch >= nt && macs <= kMaxMacsPerThreadGemm && balanced &&
                        batch * macs >= kMinParallelMacs;
  // A shared by the batch (a 1x1 conv of NCHW images) and at most 8 NR-wide panels a matrix: one
  // GEMM over the batch's columns (ColRuns), rather than a product a matrix (with the team, or one a
  // thread), whose few panels each re-streamed A and whose last panel was part padding (8 x
  // 1536x1024 @ 1024xN, two threads: 375 GFLOP/s at N = 96, 457 at N = 800). Zen5, two threads,
  // NCHW 1x1 forward, ms (eager): 8x1024x10x10 -> 1536 6.72-6.85 -> 5.5-6.2 (5.4-6.2),
  // 32x1024x14x14 -> 256 9.44-9.54 -> 8.48-8.93 (9.4-10.0), 32x2048x7x7 -> 512 9.6-9.9 -> 7.9-8.5
  // (7.5-8.8), 32x1024x3x3 -> 1024 3.56 -> 1.7-2.0 (1.3-1.75), 8x1024x2x2 -> 1024 5.2 -> 0.26 (0.25).
  const int64_t nr = gemm_blocking<T>(batch * N).nr;
  if (sb_a == 0 && batch > 1 && N <= 8 * nr && M > kSkinny && K > 0 && !(bias && bias_dim == 1)) {
    const ColRuns runs_b{N, sb_b}, runs_c{N, M * N};
    auto go = [&](auto kern) {
      gemm_driver<T, decltype(kern)>(M, batch * N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, N, bias, bias_dim, relu, true,
                                     accumulate, runs_b, runs_c);
    };
    if (portable)
      go(PortableKernel<T>{});
    else
      with_kernel<T>(gemm_blocking<T>(batch * N), go);
    return;
  }
  if (!by_batch) {
    for (int64_t i = 0; i < batch; ++i)
      g(M, N, K, A + i * sb_a, rs_a, cs_a, B + i * sb_b, rs_b, cs_b, C + i * M * N, N, bias, bias_dim, relu, true,
        accumulate);
    return;
  }
  std::exception_ptr error;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < batch; ++i) {
    try {
      g(M, N, K, A + i * sb_a, rs_a, cs_a, B + i * sb_b, rs_b, cs_b, C + i * M * N, N, bias, bias_dim, relu, false,
        accumulate);
    } catch (...) {
#pragma omp critical(dlk_mm_error)
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

template <class T>
void gemm_shared_a(int64_t batch, int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a,
                   const T* B, int64_t sb_b, int64_t rs_b, int64_t cs_b, T* C, const T* bias_row) {
  mm_batched<T>(batch, M, N, K, A, 0, rs_a, cs_a, B, sb_b, rs_b, cs_b, C, bias_row, 0, false, false, false);
}
template void gemm_shared_a<float>(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                                   int64_t, int64_t, int64_t, float*, const float*);
template void gemm_shared_a<double>(int64_t, int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                    const double*, int64_t, int64_t, int64_t, double*, const double*);

namespace {

// Sum of a contiguous row in double, in 8 independent lanes (vectorizable without reassociation,
// and a blocked sum: each lane adds only n / 8 values).
template <class T>
inline double row_sum(const T* x, int64_t n) {
  double lane[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) lane[u] += static_cast<double>(x[j + u]);
  for (; j < n; ++j) lane[j & 7] += static_cast<double>(x[j]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// g = (out <= 0) ? 0 : go, exactly as torch's threshold_backward (a NaN output passes its gradient,
// a masked NaN gradient gives 0). GCC
// keeps a float compare in a loop as a branch under its default -ftrapping-math (5x slower on a
// random sign pattern: mispredicted half the time); without trapping math it becomes a vector
// compare + multiply. Only this function is compiled so (no other semantics change).
#if defined(__GNUC__) && !defined(__clang__)
#define DLK_NO_TRAPPING_MATH __attribute__((optimize("no-trapping-math")))
#else
#define DLK_NO_TRAPPING_MATH
#endif
template <class T>
DLK_NO_TRAPPING_MATH void relu_mask(const T* __restrict go, const T* __restrict out, T* __restrict g, int64_t n) {
  for (int64_t j = 0; j < n; ++j) g[j] = out[j] <= T(0) ? T(0) : go[j];
}

// grad_pre = (out <= 0) ? 0 : grad_out (written only when relu: otherwise grad_pre is grad_out itself)
// and, when grad_bias is given, grad_pre's sums per column (bias_dim 1) or per row (bias_dim 0)
// over the batch, accumulated in double. One pass over the data.
template <class T>
void bias_act_backward(int64_t batch, int64_t M, int64_t N, const T* go, const T* out, T* gp, T* gb, int bias_dim) {
  const int64_t total = batch * M * N;
  const bool par = total >= (int64_t(1) << 15);
  auto mask_row = [go, out, gp](int64_t off, int64_t n) { relu_mask(go + off, out + off, gp + off, n); };
  if (!gb) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < batch * M; ++r) mask_row(r * N, N);
    return;
  }
  const T* g = gp ? gp : go;  // the sums read grad_pre right after it is written, while in cache
  if (bias_dim == 0) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t m = 0; m < M; ++m) {
      double s = 0.0;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t off = (b * M + m) * N;
        if (gp) mask_row(off, N);
        s += row_sum(g + off, N);
      }
      gb[m] = static_cast<T>(s);
    }
    return;
  }
  // bias_dim 1: column sums over all batch * M rows. Each thread sums its rows in blocks of
  // kRowBlock (double), adding each block's sums into its own total; totals are then combined in
  // thread order. Rows of up to 256 bytes go into the block's sums four at a time: one at a time,
  // each row's adds waited on the previous row's stores to the same sums (store-to-load forwarding,
  // a chain per row), which bound narrow rows. Interleaved with the row-at-a-time build, two threads,
  // Zen4: 15488x32 40 -> 28 us (torch's column sum 28), 25088x24 132 -> 52, 600000x16 1.26 -> 0.69 ms,
  // 150000x64 1.15 -> 1.01 ms. Wider rows keep one at a time: four 384- or 512-byte rows at once,
  // from DRAM, ran 1.3-2x slower (100000x96 1.01 -> 1.35 ms, 45000x128 0.45 -> 0.89 ms).
  constexpr int64_t kRowBlock = 128;
  const int64_t rows_at_once = N * static_cast<int64_t>(sizeof(T)) <= 256 ? 4 : 1;
  const int64_t rows = batch * M;
  const int nt = par ? omp_get_max_threads() : 1;
  std::vector<double> part(static_cast<size_t>(nt) * 2 * N, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    double* tot = part.data() + static_cast<size_t>(tid) * 2 * N;
    double* blk = tot + N;
    const int64_t r0 = rows * tid / team, r1 = rows * (tid + 1) / team;
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      const int64_t re = std::min(r1, rb + kRowBlock);
      std::fill(blk, blk + N, 0.0);
      int64_t r = rb;
      for (; rows_at_once == 4 && r + 4 <= re; r += 4) {
        if (gp) mask_row(r * N, 4 * N);
        const T *g0 = g + r * N, *g1 = g0 + N, *g2 = g1 + N, *g3 = g2 + N;
        for (int64_t j = 0; j < N; ++j)
          blk[j] += (static_cast<double>(g0[j]) + static_cast<double>(g1[j])) +
                    (static_cast<double>(g2[j]) + static_cast<double>(g3[j]));
      }
      for (; r < re; ++r) {
        if (gp) mask_row(r * N, N);
        const T* gr = g + r * N;
        for (int64_t j = 0; j < N; ++j) blk[j] += static_cast<double>(gr[j]);
      }
      for (int64_t j = 0; j < N; ++j) tot[j] += blk[j];
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    double s = 0.0;
    for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * 2 * N + j];
    gb[j] = static_cast<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// argument checks (a second fence behind dlkernels/_validation.py)
// ---------------------------------------------------------------------------------------------
// Element strides of an array of up to 3 dimensions, each non-negative (held in place: every mm
// call checks two arrays).
std::array<int64_t, 3> strides_of(const Buf& a, const char* name) {
  require(a.ndim() <= 3, name, " must have at most 3 dimensions");
  std::array<int64_t, 3> s{};
  for (int d = 0; d < a.ndim(); ++d) {
    require(a.stride(d) >= 0, name, " needs non-negative strides");
    s[d] = a.stride(d);
  }
  return s;
}

// Byte range [first, last) that an array's elements span (empty arrays span nothing).
std::pair<const char*, const char*> span_of(const Buf& a) {
  const char* p = static_cast<const char*>(a.data());
  if (a.size() == 0) return {p, p};
  int64_t last = 0;
  for (int d = 0; d < a.ndim(); ++d) last += (a.shape(d) - 1) * a.stride(d);
  return {p, p + (last + 1) * a.itemsize()};
}

bool overlaps(const Buf& x, const Buf& y) {
  const auto a = span_of(x), b = span_of(y);
  return a.first < b.second && b.first < a.second;
}

void check_output(const Buf& out, const char* name) {
  require(out.writeable(), name, " must be writeable");
  require(out.c_contiguous(), name, " must be C-contiguous");
}

template <class T>
void mm_typed(const Buf& a, const Buf& b, const py::object& bias_obj, int bias_dim, bool relu,
              const Buf& out, bool portable, bool accumulate) {
  const int nd = static_cast<int>(a.ndim());
  require(nd == 2 || nd == 3, "mm: a must be 2-D or 3-D");
  require(b.ndim() == nd && out.ndim() == nd, "mm: a, b and out must have the same rank");
  require(b.holds<T>() && out.holds<T>(), "mm: a, b and out must have one dtype");
  const int o = nd - 2;
  const int64_t batch = nd == 3 ? a.shape(0) : 1;
  const int64_t M = a.shape(o), K = a.shape(o + 1), N = b.shape(o + 1);
  require(b.shape(o) == K, "mm: inner sizes of a and b differ");
  require(nd == 2 || (b.shape(0) == batch && out.shape(0) == batch), "mm: batch sizes differ");
  require(out.shape(o) == M && out.shape(o + 1) == N, "mm: out must have shape (.., M, N)");
  require(bias_dim == 0 || bias_dim == 1, "mm: bias_dim must be 0 or 1");
  check_output(out, "mm: out");
  require(!overlaps(out, a) && !overlaps(out, b), "mm: out must not overlap a or b");
  const auto sa = strides_of(a, "mm: a"), sb = strides_of(b, "mm: b");
  const T* bias = nullptr;
  if (!bias_obj.is_none()) {
    const auto bias_arr = bias_obj.cast<Buf>();
    require(bias_arr.holds<T>(), "mm: bias must have the dtype of a");
    require(bias_arr.ndim() == 1 && bias_arr.shape(0) == (bias_dim == 1 ? N : M),
            "mm: bias must be 1-D of length N (bias_dim=1) or M (bias_dim=0)");
    require(bias_arr.shape(0) <= 1 || bias_arr.stride(0) == 1, "mm: bias must be contiguous");
    bias = static_cast<const T*>(bias_arr.data());
  }
  const T* pa = static_cast<const T*>(a.data());
  const T* pb = static_cast<const T*>(b.data());
  T* pc = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release nogil;
  mm_batched<T>(batch, M, N, K, pa, nd == 3 ? sa[0] : 0, sa[o], sa[o + 1], pb, nd == 3 ? sb[0] : 0, sb[o], sb[o + 1],
                pc, bias, bias_dim, relu, portable, accumulate);
}

// An output argument: a DLPack capsule or a numpy array (the Buf caster converts nothing else, so a
// list cannot become a temporary array whose results would be lost).
Buf output_array(const py::object& obj, const char* name) {
  py::detail::make_caster<Buf> caster;
  require(caster.load(obj, false), name, " must be a DLPack capsule or a numpy array");
  return py::detail::cast_op<Buf>(caster);
}

void mm_entry(const Buf& a, const Buf& b, const py::object& bias, int bias_dim, bool relu,
              const Buf& out, bool portable, bool accumulate) {
  dispatch_float(a, "mm", [&](auto tag) {
    mm_typed<decltype(tag)>(a, b, bias, bias_dim, relu, out, portable, accumulate);
  });
}

template <class T>
void bias_act_backward_typed(const Buf& go, const Buf& out, bool relu, int bias_dim,
                             const py::object& gp_obj, const py::object& gb_obj) {
  const int nd = static_cast<int>(go.ndim());
  require(nd == 2 || nd == 3, "bias_act_backward: grad_out must be 2-D or 3-D");
  require(bias_dim == 0 || bias_dim == 1, "bias_act_backward: bias_dim must be 0 or 1");
  require(go.c_contiguous(), "bias_act_backward: grad_out must be C-contiguous");
  const int o = nd - 2;
  const int64_t batch = nd == 3 ? go.shape(0) : 1, M = go.shape(o), N = go.shape(o + 1);
  T* gp = nullptr;
  if (relu) {
    require(out.holds<T>() && out.ndim() == nd && out.c_contiguous(),
            "bias_act_backward: out must be C-contiguous with grad_out's dtype and rank");
    for (int d = 0; d < nd; ++d) require(out.shape(d) == go.shape(d), "bias_act_backward: out's shape differs");
    require(!gp_obj.is_none(), "bias_act_backward: relu needs a grad_pre output");
    auto gpa = output_array(gp_obj, "bias_act_backward: grad_pre");
    require(gpa.holds<T>() && gpa.ndim() == nd, "bias_act_backward: grad_pre must match grad_out");
    for (int d = 0; d < nd; ++d) require(gpa.shape(d) == go.shape(d), "bias_act_backward: grad_pre's shape differs");
    check_output(gpa, "bias_act_backward: grad_pre");
    require(!overlaps(gpa, go) && !overlaps(gpa, out), "bias_act_backward: grad_pre must not overlap the inputs");
    gp = static_cast<T*>(gpa.mutable_data());
  }
  T* gb = nullptr;
  if (!gb_obj.is_none()) {
    auto gba = output_array(gb_obj, "bias_act_backward: grad_bias");
    require(gba.holds<T>() && gba.ndim() == 1 && gba.shape(0) == (bias_dim == 1 ? N : M),
            "bias_act_backward: grad_bias must be 1-D of length N (bias_dim=1) or M (bias_dim=0)");
    check_output(gba, "bias_act_backward: grad_bias");
    gb = static_cast<T*>(gba.mutable_data());
  }
  if (!gp && !gb) return;
  const T* pgo = static_cast<const T*>(go.data());
  const T* pout = relu ? static_cast<const T*>(out.data()) : nullptr;
  py::gil_scoped_release nogil;
  bias_act_backward<T>(batch, M, N, pgo, pout, gp, gb, bias_dim);
}

}  // namespace

void init_matmul(py::module_& m) {
  m.def(
      "mm",
      [](const Buf& a, const Buf& b, const py::object& bias, int bias_dim, bool relu,
         const py::object& out, bool accumulate) {
        mm_entry(a, b, bias, bias_dim, relu, output_array(out, "mm: out"), false, accumulate);
      },
      py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("bias_dim"), py::arg("relu"), py::arg("out"),
      py::arg("accumulate") = false,
      "out[...] = act((out if accumulate else 0) + a @ b + bias): a (M, K) or (B, M, K), b (K, N) or "
      "(B, K, N), any non-negative strides; out C-contiguous (M, N) or (B, M, N); bias None or contiguous 1-D (N for bias_dim=1, M for bias_dim=0)");
  m.def(
      "mm_scalar_for_test",
      [](const Buf& a, const Buf& b, const py::object& bias, int bias_dim, bool relu,
         const py::object& out, bool accumulate) {
        mm_entry(a, b, bias, bias_dim, relu, output_array(out, "mm: out"), true, accumulate);
      },
      py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("bias_dim"), py::arg("relu"), py::arg("out"),
      py::arg("accumulate") = false,
      "mm through the portable scalar micro-kernel (the fallback of builds without AVX2/FMA), for tests");
  m.def(
      "bias_act_backward",
      [](const Buf& grad_out, const Buf& out, bool relu, int bias_dim, const py::object& grad_pre,
         const py::object& grad_bias) {
        dispatch_float(grad_out, "bias_act_backward", [&](auto tag) {
          bias_act_backward_typed<decltype(tag)>(grad_out, out, relu, bias_dim, grad_pre, grad_bias);
        });
      },
      py::arg("grad_out"), py::arg("out"), py::arg("relu"), py::arg("bias_dim"), py::arg("grad_pre"),
      py::arg("grad_bias"),
      "grad_pre[...] = (out <= 0 ? 0 : grad_out) (relu; grad_pre None otherwise) and grad_bias[...] = grad_pre "
      "summed over all dims but bias_dim of the last two (grad_bias None to skip)");
}

}  // namespace dlk
