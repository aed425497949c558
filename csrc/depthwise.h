// Depthwise forward building blocks, shared by depthwise.cpp and the fused separable kernel:
// output rows of one channel from a staged plane (NCHW) and output rows / pixels across all
// channels (channels_last).
#pragma once

#include "conv_common.h"

#include <array>
#include <memory>
#include <utility>
#include <type_traits>

namespace dlk {

// Geometry of a depthwise conv: input (N, C, H, W), weight (C*m, 1, kH, kW), output (N, C*m, Ho, Wo).
struct DwGeom {
  int64_t N, C, H, W, m, Cm, kH, kW, Ho, Wo;
  int64_t sH, sW, pT, pL, dH, dW;
  TapRange jin;  // output columns whose whole window is inside the input
  // Channels_last kernels only: elements between consecutive taps of the taps-major weights
  // (taps_major); Cm unless padded (cl_padded).
  int64_t ws;
};

inline DwGeom make_geom(int64_t N, int64_t C, int64_t H, int64_t W, int64_t Cm, int64_t kH, int64_t kW,
                        int64_t Ho, int64_t Wo, int64_t sH, int64_t sW, int64_t pT, int64_t pL, int64_t dH,
                        int64_t dW) {
  check_conv_geometry(sH, sW, pT, pL, dH, dW);
  require(N >= 0 && C >= 1 && H >= 1 && W >= 1 && kH >= 1 && kW >= 1 && Ho >= 0 && Wo >= 0, "bad sizes");
  require(Cm >= C && Cm % C == 0, "weight's output channels must be a multiple m >= 1 of the input channels");
  DwGeom g{N, C, H, W, Cm / C, Cm, kH, kW, Ho, Wo, sH, sW, pT, pL, dH, dW, {0, 0}, Cm};
  g.jin = interior_range(Wo, sW, pL, dW, kW, W);
  return g;
}

// NR rows x NV vectors of outputs, out[r*ors + v*L + l] = b + sum over taps t of
// wo[t] * X[offs[t] + r*xrs + v*L + l]: X is a staged block (DwStage) at the first output's
// position, every read in bounds. The NR*NV accumulators are independent chains: one or two
// vectors alone would be a chain of kH*kW dependent FMAs, latency-bound.
template <class T, int NR, int NV>
inline void dw_block(const T* X, const int64_t* offs, int64_t K, const T* wo, T b, T* out, int64_t xrs, int64_t ors) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[NR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vbroadcast(b);
  for (int64_t t = 0; t < K; ++t) {
    const V wv = vbroadcast(wo[t]);
    const T* xs = X + offs[t];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += wv * vload(xs + r * xrs + v * L);
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(out + r * ors + v * L, acc[r][v]);
}

// f(integral_constant<int, 0>) ... f(integral_constant<int, N - 1>): loop indices that are constants,
// so that FixedTaps' tap structure is resolved while compiling.
template <class F, int... I>
DLK_INLINE void static_for_seq(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
DLK_INLINE void static_for(F&& f) {
  static_for_seq(f, std::make_integer_sequence<int, N>{});
}

// f(integral_constant<int, n>) for a runtime count n in [1, N] (larger n as N): a kernel templated
// on how many accumulators it keeps in registers, picked at run time.
template <int N, class F>
DLK_INLINE void with_count(int64_t n, F&& f) {
  if constexpr (N > 1)
    if (n < N) return with_count<N - 1>(n, f);
  f(std::integral_constant<int, N>{});
}

// f(integral_constant<int, nb>, j) for blocks [j, j + nb) that tile [j0, j1): as few blocks of at most
// NJ as cover it, their sizes as equal as the count allows (9 pixels in 8-wide blocks: 5, 4), so that
// no pixel is computed twice.
template <int NJ, class F>
DLK_INLINE void balanced_blocks(int64_t j0, int64_t j1, F&& f) {
  const int64_t n = j1 - j0, nb = ceil_div(n, int64_t{NJ}), q = n / std::max<int64_t>(nb, 1), big = n - q * nb;
  for (int64_t b = 0, j = j0; b < nb; ++b) {
    const int64_t size = q + (b < big);  // the first n % nb blocks take one more
    with_count<NJ>(size, [&](auto k) { f(k, j); });
    j += size;
  }
}

// v as an opaque register value: an empty asm the compiler cannot see through, so that a loaded
// vector feeding several FMAs stays one load instead of being folded into each FMA as a memory
// operand. A no-op without AVX, where the 32-byte vector fits no single register.
template <class V>
DLK_INLINE void opaque(V& v) {
#if defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// dw_block for a KH x KW window of dilation 1 over phase planes PB apart (stride SH x SW, see DwStage),
// known while compiling. dw_block loads the input under every (row, tap) pair; rows r and r + 1 read
// the same input row for taps a row apart, so for a 3x3 window it loads each input vector 2 (NR = 4)
// to 3 times. Here each input vector is loaded once and fed to every output row that reads it
// (fixed row and column offsets cannot be matched at run time), and the weights stay in registers.
template <class T, int KH, int KW, int SH, int SW, int B = 32, int WR = KH * KW>
struct FixedTaps {
  using V = typename Vec<T, B>::type;
  static constexpr int K = KH * KW;
  int64_t PB;  // elements between phase planes
  V wv[K];     // the taps' weights, broadcast
  T b;

  FixedTaps(int64_t PB_, const T* wo, T b_) : PB(PB_), b(b_) {
    for (int t = 0; t < K; ++t) wv[t] = vbroadcast<T, B>(wo[t]);
  }

  template <int NR, int NV>
  DLK_INLINE void block(const T* X, T* out, int64_t xrs, int64_t ors, int64_t vs = Vec<T, B>::lanes) const {
    V w[K], acc[NR][NV];
    // Each weight and input vector opaque: GCC otherwise re-read them from memory under every FMA
    // (memory operands), two loads per FMA.
    static_for<K>([&](auto t) DLK_LAMBDA_INLINE { if constexpr (t < WR) { w[t] = wv[t]; opaque(w[t]); } });
    static_for<NR>([&](auto r) DLK_LAMBDA_INLINE { static_for<NV>([&](auto v) DLK_LAMBDA_INLINE { acc[r][v] = vbroadcast<T, B>(b); }); });
    static_for<SH>([&](auto a) DLK_LAMBDA_INLINE {
      static_for<SW>([&](auto bq) DLK_LAMBDA_INLINE {
        constexpr int PH = (KH - 1 - a) / SH + 1, QW = (KW - 1 - bq) / SW + 1;  // taps in this phase
        const T* Xp = X + (a * SW + bq) * PB;
        static_for<NR + PH - 1>([&](auto u) DLK_LAMBDA_INLINE {
          static_for<QW>([&](auto c) DLK_LAMBDA_INLINE {
            V x[NV];
            static_for<NV>([&](auto v) DLK_LAMBDA_INLINE { x[v] = vload<T, B>(Xp + u * xrs + c + v * vs); opaque(x[v]); });
            static_for<NR>([&](auto r) DLK_LAMBDA_INLINE {
              constexpr int pp = int(u) - int(r);
              if constexpr (pp >= 0 && pp < PH) {
                constexpr int t = (pp * SH + a) * KW + c * SW + bq;
                if constexpr (t < WR)
                  static_for<NV>([&](auto v) DLK_LAMBDA_INLINE { acc[r][v] += w[t] * x[v]; });
                else
                  static_for<NV>([&](auto v) DLK_LAMBDA_INLINE { acc[r][v] += wv[t] * x[v]; });
              }
            });
          });
        });
      });
    });
    static_for<NR>([&](auto r) DLK_LAMBDA_INLINE { static_for<NV>([&](auto v) DLK_LAMBDA_INLINE { vstore(out + r * ors + v * vs, acc[r][v]); }); });
  }
};

// Even and odd elements of s[0, 2n) into e[0, n) and o[0, n): the column phases of a stride-2 row,
// two vectors at a time through shuffles (a scalar de-interleave cost as much as the convolution).
// In 64-byte vectors on the AVX-512 machine where the row has a whole one of pairs: interleaved, two
// threads, from DRAM (copy 45 GB/s), the staged forward 8x96x112x112 s2 1.26 -> 1.20 ms, 5x5 1.33 ->
// 1.23; 8x256x38x38 (19 pairs) unchanged.
template <class T, int B = 32>
inline void split_even_odd(const T* s, T* e, T* o, int64_t n) {
  if constexpr (B == 32)
    if (kAvx512Machine && n >= Vec<T, 64>::lanes) return split_even_odd<T, 64>(s, e, o, n);
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::lanes;
  using I = decltype(V{} < V{});  // integer vector of the lanes' width, for the shuffle masks
  I me, mo;
  for (int l = 0; l < L; ++l) me[l] = 2 * l, mo[l] = 2 * l + 1;
  auto pair = [&](int64_t v) {
    const V a = vload<T, B>(s + 2 * v), c = vload<T, B>(s + 2 * v + L);
    vstore(e + v, __builtin_shuffle(a, c, me));
    vstore(o + v, __builtin_shuffle(a, c, mo));
  };
  if (n < L) {
    for (int64_t v = 0; v < n; ++v) e[v] = s[2 * v], o[v] = s[2 * v + 1];
    return;
  }
  int64_t v = 0;
  for (; v + L <= n; v += L) pair(v);
  if (v < n) pair(n - L);  // the last vectors moved back to end at n (rewriting equal values)
}

// d[2c] = e[c] for c < ne, d[2c + 1] = o[c] for c < no (ne - no is 0 or 1): the inverse of
// split_even_odd, interleaving the two column phases of a stride-2 row. STREAM: the whole vectors
// with non-temporal stores (d aligned to a vector; whole lines where 2 * no is a multiple of 64 bytes).
template <class T, bool STREAM = false>
inline void merge_even_odd(const T* e, const T* o, T* d, int64_t ne, int64_t no) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  using I = decltype(V{} < V{});
  I lo, hi;
  for (int l = 0; l < L; ++l) lo[l] = l / 2 + (l % 2) * L, hi[l] = L / 2 + l / 2 + (l % 2) * L;
  int64_t c = 0;
  for (; c + L <= no; c += L) {
    const V a = vload(e + c), b = vload(o + c);
    if constexpr (STREAM) {
      vstream(d + 2 * c, __builtin_shuffle(a, b, lo));
      vstream(d + 2 * c + L, __builtin_shuffle(a, b, hi));
    } else {
      vstore(d + 2 * c, __builtin_shuffle(a, b, lo));
      vstore(d + 2 * c + L, __builtin_shuffle(a, b, hi));
    }
  }
  for (; c < no; ++c) d[2 * c] = e[c], d[2 * c + 1] = o[c];
  if (c < ne) d[2 * c] = e[c];
}

// Output rows per chunk of dw_rows_staged's flat form for staged rows of Wp columns (an L1-sized
// result), and the scratch that chunk needs.
inline int64_t flat_rows(int64_t Wp) { return std::max<int64_t>(1, 512 / Wp); }
inline int64_t flat_size(int64_t Wp) { return flat_rows(Wp) * Wp + 64; }

// Layout of the staged input of output rows [i0, i0 + rows) of one NCHW plane: sH*sW phase planes,
// phase (a, b) holding input (u*sH + a + i0*sH - pT, v*sW + b - pL) at u*Wp + v, zeros in the padding.
// Output (i, j)'s tap (p, q) then reads phase ((p*dH) % sH, (q*dW) % sW) at (i + (p*dH)/sH)*Wp +
// j + (q*dW)/sW: every tap is a fixed offset offs[t] from i*Wp + j, whatever the strides, and
// consecutive outputs of a row read consecutive elements. The Wp - Wo columns past each row's
// outputs let the whole block be read as one flat row of rows*Wp outputs.
struct DwStage {
  int64_t rows = -1, Wp, PR, PB, nph, pad_end, tmp, flat;
  std::vector<int64_t> offs;

  DwStage() = default;
  DwStage(const DwGeom& g, int64_t rows_) : rows(rows_) {
    constexpr int64_t L = 64;  // >= any Vec<T>::lanes
    Wp = g.Wo + ((g.kW - 1) * g.dW) / g.sW;
    PR = rows + ((g.kH - 1) * g.dH) / g.sH;
    PB = PR * Wp;
    nph = g.sH * g.sW;
    // A flat block's last vector reads up to Wp - Wo + L - 1 elements past the last phase plane.
    pad_end = Wp + L;
    tmp = g.sW > 2 ? g.sW * Wp : 0;  // a padded input row, for column strides above 2 (see dw_stage)
    flat = flat_size(Wp);
    for (int64_t p = 0; p < g.kH; ++p)
      for (int64_t q = 0; q < g.kW; ++q) {
        const int64_t ph = p * g.dH / g.sH, qh = q * g.dW / g.sW;
        const int64_t a = p * g.dH - ph * g.sH, b = q * g.dW - qh * g.sW;
        offs.push_back((a * g.sW + b) * PB + ph * Wp + qh);
      }
  }
  int64_t size() const { return nph * PB + pad_end + tmp + flat; }
};

// d[0, n) = s[0, n): vectors of B bytes, the last one moved back to end at n (rewriting equal
// values) when n has a partial vector, so a 10-wide row is two stores and no scalar loop.
template <class T, int B = 32>
inline void copy_row(T* d, const T* s, int64_t n) {
  constexpr int L = Vec<T, B>::lanes;
  if (n < L) {
    for (int64_t j = 0; j < n; ++j) d[j] = s[j];
    return;
  }
  int64_t j = 0;
  for (; j + L <= n; j += L) vstore(d + j, vload<T, B>(s + j));
  if (j < n) vstore(d + n - L, vload<T, B>(s + n - L));
}

// A thread's staging buffer for dw_rows_padded, serving one geometry. Its padding zeros depend
// only on the layout (key), not on the plane: they are written when the layout changes and the
// planes after it copy only their data, which on 10x10 planes (12 short rows, each with a zero
// column either side) halves the staging work. The layouts of its geometry's two block heights
// (full and last) are kept too: building one costs about as much as staging a 10x10 plane.
template <class T>
struct DwScratch {
  std::vector<T> buf;
  std::array<int64_t, 8> key{};
  const T* zeroed = nullptr;  // buf.data() when key describes its zeros
  DwStage st[2];

  const DwStage& stage(const DwGeom& g, int64_t rows) {
    if (st[0].rows == rows) return st[0];
    if (st[1].rows == rows) return st[1];
    st[1] = std::move(st[0]);
    st[0] = DwStage(g, rows);
    return st[0];
  }
};

// Copies the input rows that output rows [i0, i0 + PR - rx) read into the phase planes at X
// (sc.buf), writing the zeros around them first if sc does not hold them for this layout.
// pf_lines of pf (the next task's input) are prefetched over the strided copy's rows (column stride
// 1 takes none: its copy is cheap, and prefetching there measured the same or slower).
template <class T>
void dw_stage(const T* xp, int64_t i0, const DwGeom& g, const DwStage& st, DwScratch<T>& sc, LinePrefetch* pf = nullptr,
              int64_t pf_lines = 0) {
  const int64_t tw = g.sW * st.Wp;  // padded columns covered by the phases
  const int64_t c_lo = std::min(tw, std::max<int64_t>(0, g.pL)), c_hi = std::max(c_lo, std::min(tw, g.W + g.pL));
  const int64_t r0 = i0 * g.sH - g.pT;  // input row of phase 0's row 0
  const std::array<int64_t, 8> key{st.Wp, st.PR, g.sH, g.sW, c_lo, c_hi, r0, g.H};
  const int64_t zeros = st.size() - st.flat;  // the phase planes, their slack and tmp
  if (sc.buf.size() < static_cast<size_t>(st.size())) sc.buf.resize(static_cast<size_t>(st.size()));
  T* X = sc.buf.data();
  if (sc.zeroed != X || sc.key != key) {
    std::fill(X, X + zeros, T(0));
    sc.key = key, sc.zeroed = X;
  }
  // Column stride 1 in a loop of its own, its geometry in locals (copy_row stores through memcpy,
  // which may alias g and st): in one loop with the strided case a 10x10 plane staged in 172
  // cycles, alone in 64 (one thread, L1).
  if (g.sW == 1) {
    const int64_t H = g.H, W = g.W, sH = g.sH, PR = st.PR, Wp = st.Wp, PB = st.PB, n = c_hi - c_lo;
    const T* xs = xp - g.pL + c_lo;  // input row ih's first copied column at xs + ih*W
    for (int64_t a = 0; a < sH; ++a)
      for (int64_t u = 0; u < PR; ++u) {
        const int64_t ih = r0 + u * sH + a;
        if (ih >= 0 && ih < H) copy_row(X + a * PB + u * Wp + c_lo, xs + ih * W, n);
      }
    return;
  }
  T* tmp = X + st.nph * st.PB + st.pad_end;
  const int64_t pf_step = pf ? LinePrefetch::share_of(pf_lines, g.sH * st.PR) : 0;
  for (int64_t a = 0; a < g.sH; ++a)
    for (int64_t u = 0; u < st.PR; ++u) {
      const int64_t ih = r0 + u * g.sH + a;
      if (pf) pf->step(pf_step);
      if (ih < 0 || ih >= g.H) continue;
      const T* src = xp + ih * g.W - g.pL;
      T* d = X + a * g.sW * st.PB + u * st.Wp;
      if (g.sW == 2) {
        // Straight from the input row: padded columns [c_lo, c_hi) go to phase c % 2 at c / 2 (the
        // padding columns hold the layout's zeros, never written here). Through a copy of the row
        // into tmp first, staging took ~5x the arithmetic of a 38x38 plane.
        T *e = d, *o = d + st.PB;
        int64_t c = c_lo;
        if (c % 2 != 0 && c < c_hi) o[c / 2] = src[c], ++c;
        const int64_t pairs = (c_hi - c) / 2;
        split_even_odd(src + c, e + c / 2, o + c / 2, pairs);
        c += 2 * pairs;
        if (c < c_hi) e[c / 2] = src[c];
      } else {
        copy_row(tmp + c_lo, src + c_lo, c_hi - c_lo);
        for (int64_t b = 0; b < g.sW; ++b)
          for (int64_t v = 0; v < st.Wp; ++v) d[b * st.PB + v] = tmp[v * g.sW + b];
      }
    }
}

// Runs blk(NR, NV, i, j) (NR, NV: integral_constants) over output rows [0, rows) of Wo >= L columns:
// blocks of NR = 4 rows (then 2, 1) by NV vectors (then 1), the last partial vector moved back to
// end at Wo; pf's lines prefetched a share per row group. BACK: the row's last columns as one more
// NV-vector block instead, moved back to end at Wo, or for Wo < NV*L (NV = 2) vectors at 0 and Wo - L
// (blk's fifth argument: the distance between its vectors), so that every block keeps NV*NR
// accumulators.
template <int NV, int L, class B, bool BACK = false>
DLK_INLINE void wide_blocks(int64_t rows, int64_t Wo, LinePrefetch& pf, B blk) {
  const int64_t pf_step = pf.share(ceil_div(rows, 4));
  auto group = [&](auto nr, int64_t i) {
    pf.step(pf_step);
    int64_t j = 0;
    for (; j + NV * L <= Wo; j += NV * L) blk(nr, std::integral_constant<int, NV>{}, i, j);
    if constexpr (BACK) {
      if (j < Wo) {
        if (Wo >= NV * L) blk(nr, std::integral_constant<int, NV>{}, i, Wo - NV * L, int64_t(L));
        else blk(nr, std::integral_constant<int, NV>{}, i, 0, Wo - L);
      }
      return;
    }
    for (; j + L <= Wo; j += L) blk(nr, std::integral_constant<int, 1>{}, i, j);
    if (j < Wo) blk(nr, std::integral_constant<int, 1>{}, i, Wo - L);
  };
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) group(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= rows; i += 2) group(std::integral_constant<int, 2>{}, i);
  for (; i < rows; ++i) group(std::integral_constant<int, 1>{}, i);
}

// Output rows [r0, r1) of out (row stride Wo), prefetched for writing, two row groups ahead of the
// row kernels' stores, which otherwise waited on reading each output line (write-allocate; a quarter
// of the FixedTaps pass's samples sat on its stores). Rows past a task's are the next task's, usually
// this thread's next plane. Interleaved, two threads, from DRAM, copy 45 GB/s: 8x128x75x75 1.39 ->
// 1.05 ms, 8x144x56x56 0.64 -> 0.54, 5x5 0.94 -> 0.87, 8x96x112x112 s2 1.31 -> 1.17 (one group ahead:
// 1.11, 0.56, 0.88, 1.19). On AMD family 19h (prefetch_into_l2) into L2 with a read prefetch
// (prefetcht1; x86 has no write prefetch into L2) instead of prefetchw into L1, which stalled there as
// the input's prefetcht0 did. Zen4, two threads, from DRAM, interleaved in one process (15 rounds),
// prefetchw -> prefetcht1: forward 8x144x56x56 1.18 -> 0.98 ms and 1.10 -> 1.02 in a second run,
// 8x128x75x75 1.83 -> 1.42 and 2.12 -> 1.68, 8x96x112x112 s2 2.05 -> 1.82, 5x5 s2 2.12 -> 1.88, 5x5
// 8x144x56x56 1.57 -> 1.35, 8x240x28x28 0.62 -> 0.59, 8x32x112x112 0.92 -> 0.86, 7x7 8x96x56x56
// 1.59 / 1.57; forward+backward 8x128x75x75 8.82 -> 7.66, 8x144x56x56 6.49 -> 6.15. No prefetch at
// all fell between the two (8x128x75x75 1.75, 8x144x56x56 1.07).
template <class T>
DLK_INLINE void prefetch_output_rows(const T* out, int64_t r0, int64_t r1, int64_t Wo) {
  const T *a = out + r0 * Wo, *e = out + r1 * Wo;
  if (prefetch_into_l2())
    for (; a < e; a += 64 / sizeof(T)) __builtin_prefetch(a, 0, 2);
  else
    for (; a < e; a += 64 / sizeof(T)) __builtin_prefetch(a, 1);
}

// Output rows [0, rows) from a staged block X of row stride Wp, output (i, j) = b + sum over taps t
// of wo[t] * X[offs[t] + i*Wp + j] (every read in bounds, including up to L - 1 elements past the
// last row's output Wo - 1 for the flat form), written at out (row stride Wo); F: flat_size(Wp)
// scratch. Rows of at least four vectors go straight to out in blocks of rows x two vectors (a last
// partial vector moved back to end at the row's end); narrower rows are computed as one flat row of
// rc*Wp outputs per chunk (the Wp - Wo garbage columns cost less than the partial vectors and the
// one-vector blocks of 10- to 19-wide rows) into F, whose rows are then copied out.
template <class T>
void dw_rows_staged(const T* X, int64_t Wp, const int64_t* offs, int64_t K, const T* wo, T b, T* out, int64_t rows,
                    int64_t Wo, T* F, LinePrefetch pf = {}) {
  constexpr int L = Vec<T>::lanes;
  if (Wo >= 4 * L) {
    wide_blocks<2, L>(rows, Wo, pf, [&](auto nr, auto nv, int64_t i, int64_t j) {
      constexpr int NR = decltype(nr)::value;
      if (j == 0) prefetch_output_rows(out, i + 2 * NR, std::min(rows + 8, i + 3 * NR), Wo);
      dw_block<T, NR, decltype(nv)::value>(X + i * Wp + j, offs, K, wo, b, out + i * Wo + j, Wp, Wo);
    });
    return;
  }
  const int64_t rc = flat_rows(Wp);
  const int64_t pf_step = pf.share(ceil_div(rows, rc));
  for (int64_t i0 = 0; i0 < rows; i0 += rc) {
    pf.step(pf_step);
    const int64_t nr = std::min(rc, rows - i0), n = ceil_div(nr * Wp - (Wp - Wo), L) * L;
    const T* Xi = X + i0 * Wp;
    int64_t f = 0;
    for (; f + 8 * L <= n; f += 8 * L) dw_block<T, 1, 8>(Xi + f, offs, K, wo, b, F + f, 0, 0);
    if (f + 4 * L <= n) dw_block<T, 1, 4>(Xi + f, offs, K, wo, b, F + f, 0, 0), f += 4 * L;
    if (f + 2 * L <= n) dw_block<T, 1, 2>(Xi + f, offs, K, wo, b, F + f, 0, 0), f += 2 * L;
    if (f < n) dw_block<T, 1, 1>(Xi + f, offs, K, wo, b, F + f, 0, 0);
    for (int64_t i = 0; i < nr; ++i) copy_row(out + (i0 + i) * Wo, F + i * Wp, Wo);
  }
}

// dw_rows_staged for a window known while compiling (FixedTaps): blocks of up to 4 rows x NV vectors
// of B bytes, laid out by wide_blocks (dw_rows_padded says which kernel runs where).
template <class T, class Taps, int NV = 1, int B = 32, bool BACK = false>
void dw_rows_fixed(const T* X, int64_t Wp, const Taps& tp, T* out, int64_t rows, int64_t Wo, LinePrefetch pf) {
  auto blk = [&](auto nr, auto nv, int64_t i, int64_t j, int64_t vs = Vec<T, B>::lanes) {
    constexpr int NR = decltype(nr)::value;
    if (j == 0) prefetch_output_rows(out, i + 2 * NR, std::min(rows + 8, i + 3 * NR), Wo);
    tp.template block<NR, decltype(nv)::value>(X + i * Wp + j, out + i * Wo + j, Wp, Wo, vs);
  };
  wide_blocks<NV, Vec<T, B>::lanes, decltype(blk), BACK>(rows, Wo, pf, blk);
}

// Whether prefetching the next H x W plane pays: not under 4 KiB, where a task lasts ~100 ns and the
// hardware prefetcher already streams the next plane (8x1024x10x10 0.45 -> 0.48 ms and 8x728x19x19
// 0.74 -> 0.77 with it).
template <class T>
inline bool plane_prefetch_pays(int64_t H, int64_t W) { return H * W * static_cast<int64_t>(sizeof(T)) >= 4096; }

// The input rows that output rows [i0, i1) read (those their windows reach inside the input), as
// one range of rows of row_len elements from base: an NCHW plane's (row_len W) or a channels-last
// image's (W*C).
template <class T>
LinePrefetch window_rows(const T* base, int64_t i0, int64_t i1, const DwGeom& g, int64_t row_len) {
  const int64_t r0 = std::max<int64_t>(0, i0 * g.sH - g.pT);
  const int64_t r1 = std::min<int64_t>(g.H, (i1 - 1) * g.sH - g.pT + (g.kH - 1) * g.dH + 1);
  return r1 > r0 ? LinePrefetch(base + r0 * row_len, base + r1 * row_len) : LinePrefetch();
}

// The input of output rows [i0, i1) of the plane at xp, where prefetching it pays.
template <class T>
LinePrefetch plane_rows_input(const T* xp, int64_t i0, int64_t i1, const DwGeom& g) {
  return plane_prefetch_pays<T>(g.H, g.W) ? window_rows(xp, i0, i1, g, g.W) : LinePrefetch();
}

// Output rows [i0, i1) of one channel, written at out (row stride Wo): the input rows they read are
// first staged, zero-padded and phase-split (DwStage), into sc (a thread's scratch, L1/L2-sized
// for a row block), so that every output is interior and the same vector kernel serves borders,
// strides, dilations and negative padding (crop) without bounds checks.
template <class T>
void dw_rows_padded(const T* xp, const T* wo, T b, T* out, int64_t i0, int64_t i1, const DwGeom& g,
                    DwScratch<T>& sc, LinePrefetch pf = {}) {
  if (i1 <= i0 || g.Wo == 0) return;
  const DwStage& st = sc.stage(g, i1 - i0);
  // At column strides above 1 the staging (split_even_odd, or a scalar gather) takes about as long as
  // the arithmetic, so half the next task's input is prefetched while staging (spread over its rows)
  // and the rest while computing; all of it in the arithmetic left DRAM idle through the staging, and
  // the next staging then waited on it. Two threads, inputs from DRAM, interleaved in one process
  // (Zen4): 3x3 s2 8x96x112x112 2.04 -> 1.63 ms, 8x32x224x224 2.97 -> 2.52, 5x5 s2 8x96x112x112 2.01
  // -> 1.89, 3x3 s3 8x64x97x97 1.57 -> 1.33. In earlier runs the first three with a third of it while
  // staging 1.70 / 2.59 / 1.99 against half's 1.66 / 2.52 / 1.95, with all of it 1.80 / 2.74 / 2.31
  // against 1.66 / 2.67 / 2.03. Stride 1 (copy_row, cheap) measured the same or slower.
  dw_stage(xp, i0, g, st, sc, &pf, pf.count() / 2);  // (stride 1's copy ignores pf)
  T *X = sc.buf.data(), *F = X + st.size() - st.flat;
  const int64_t rows = i1 - i0;
  // 3x3 and 5x5 windows of dilation 1 and stride 1 or 2 in kernels whose taps are fixed while compiling
  // (FixedTaps): each input vector loaded once for the output rows that read it.
  if constexpr (kAvx512Machine) {
    // AVX-512 (32 registers), rows of 16 outputs or more: blocks of 4 rows x two 64-byte vectors.
    // FMAs take 4 cycles and this CPU issues 2 a cycle, so a block needs 8 independent accumulators:
    // 4 rows x one vector ran one FMA a cycle. Stride 1 and 3x3 at stride 2 under 32 outputs: the
    // row's last block is moved back to end at its end (rows of 16-31 outputs: its two vectors
    // overlap); 3x3 keeps its 9 weights in registers, 5x5 reads its 25 from L1 as memory operands
    // (20 in registers measured the same). Interleaved, two threads, input from DRAM, against 4 rows x
    // one vector (5x5; 3x3 s1 in 32-byte vectors) or the generic kernel (3x3 s2 under 32 outputs):
    // 5x5 8x144x56x56 1.02-1.08 -> 0.86-0.92 ms, 8x240x28x28 0.44 -> 0.33, 8x480x20x20 0.58 -> 0.44; 3x3
    // s2 8x256x38x38 0.50-0.55 -> 0.44-0.475; 3x3 s1 8x144x56x56 0.61 -> 0.51 and 8x128x75x75 1.22 ->
    // 1.07 with the copy at 77 GB/s, 0.61-0.70 -> 0.60-0.67 and within 4 % with it at 43-46 GB/s
    // (memory-bound there). At stride 2 from 32 outputs the last vector is a one-vector block (moved
    // back the same way): 3x3 8x96x112x112 1.42-1.57 -> 1.15-1.32 ms against 32-byte vectors, 8x256x38x38
    // 0.49-0.52 -> 0.455-0.48 (its rows then had 19 outputs), and the same (+0-8 %) with a two-vector
    // last block; 5x5 (one vector a block) 8x96x112x112 1.45 -> 1.34 ms against the generic kernel,
    // 8x240x56x56 1.18 -> 0.85, and the same (1.40-1.49 -> 1.42-1.52) in two-vector blocks. 7x7 at
    // stride 1 (ConvNeXt's window) likewise, against the generic kernel: 8x96x56x56 1.62 -> 0.82 ms
    // (eager 1.25), 8x192x28x28 1.00 -> 0.51 (eager 0.52-0.57).
    if (g.dH == 1 && g.dW == 1 && g.kH == g.kW && g.sH == g.sW && g.Wo >= Vec<T, 64>::lanes) {
      auto back = [&](auto taps) {
        return dw_rows_fixed<T, decltype(taps), 2, 64, true>(X, st.Wp, taps, out, rows, g.Wo, pf);
      };
      using S3 = FixedTaps<T, 3, 3, 2, 2, 64>;
      using S5 = FixedTaps<T, 5, 5, 2, 2, 64>;
      if (g.sH == 1 && g.kH == 3) return back(FixedTaps<T, 3, 3, 1, 1, 64>(st.PB, wo, b));
      if (g.sH == 1 && g.kH == 5) return back(FixedTaps<T, 5, 5, 1, 1, 64, 0>(st.PB, wo, b));
      if (g.sH == 1 && g.kH == 7) return back(FixedTaps<T, 7, 7, 1, 1, 64, 0>(st.PB, wo, b));
      if (g.sH == 2 && g.kH == 3 && g.Wo < 2 * Vec<T, 64>::lanes) return back(S3(st.PB, wo, b));
      if (g.sH == 2 && g.kH == 3) return dw_rows_fixed<T, S3, 2, 64>(X, st.Wp, S3(st.PB, wo, b), out, rows, g.Wo, pf);
      if (g.sH == 2 && g.kH == 5) return dw_rows_fixed<T, S5, 1, 64>(X, st.Wp, S5(st.PB, wo, b), out, rows, g.Wo, pf);
    }
    // Rows of 8-15 outputs (float) at stride 1: the same blocks in 32-byte vectors (two, overlapping).
    // Interleaved, two threads, from DRAM, against the generic kernel: 7x7 8x384x14x14 0.667 -> 0.453
    // ms (eager 0.29: small planes with large windows stay its ground, see depthwise_masked.h).
    if (g.dH == 1 && g.dW == 1 && g.kH == g.kW && g.sH == 1 && g.sW == 1 && g.Wo >= Vec<T, 32>::lanes &&
        g.Wo < Vec<T, 64>::lanes) {
      auto back32 = [&](auto taps) {
        return dw_rows_fixed<T, decltype(taps), 2, 32, true>(X, st.Wp, taps, out, rows, g.Wo, pf);
      };
      if (g.kH == 3) return back32(FixedTaps<T, 3, 3, 1, 1, 32>(st.PB, wo, b));
      if (g.kH == 5) return back32(FixedTaps<T, 5, 5, 1, 1, 32, 0>(st.PB, wo, b));
      if (g.kH == 7) return back32(FixedTaps<T, 7, 7, 1, 1, 32, 0>(st.PB, wo, b));
    }
  } else if (g.dH == 1 && g.dW == 1 && g.kH == 3 && g.kW == 3 && g.sH == g.sW && g.sH <= 2 &&
             g.Wo >= 4 * Vec<T>::lanes) {
    // AVX (16 registers): 4 rows x one 32-byte vector: 4 accumulators, 9 weights and the input vector
    // fit (4 x 2 spilled the weights, and the compiler then re-loaded the input under every FMA).
    if (g.sH == 1) return dw_rows_fixed(X, st.Wp, FixedTaps<T, 3, 3, 1, 1>(st.PB, wo, b), out, rows, g.Wo, pf);
    return dw_rows_fixed(X, st.Wp, FixedTaps<T, 3, 3, 2, 2>(st.PB, wo, b), out, rows, g.Wo, pf);
  }
  dw_rows_staged(X, st.Wp, st.offs.data(), g.kH * g.kW, wo, b, out, rows, g.Wo, F, pf);
}

// Whether an AVX-512 build runs the channels-last kernels over a pixel's `channels` in 64-byte
// vectors: where those are whole cache lines, so that no load splits a line and no tail is left
// (cl_staged_row_kw, cl_gather_pixels and wgrad_row_cl_staged measure why).
template <class T>
inline bool wide_pixels(int64_t channels) {
  return kAvx512Machine && channels * static_cast<int64_t>(sizeof(T)) % 64 == 0;
}
// Whether an AVX-512 build's pixel of `channels` ends in half a 64-byte vector (728 floats: 45.5
// lines), which the channels-last kernels run as 64-byte vectors and one 32-byte vector
// (cl_staged_row_kw) or, streamed, by pixel pairs (cl_staged_row_pairs).
template <class T>
inline bool half_line_tail(int64_t channels) {
  return kAvx512Machine && channels * static_cast<int64_t>(sizeof(T)) % 64 == 32;
}

// The input gradient as a stride-1 forward conv: grad_y is its input (Ho, Wo), grad_x its output (H, W),
// with the taps flipped (flipped_taps) and padding (k-1)*d - pad (negative where pad > (k-1)*d). At
// stride 1 that is the whole map; at stride s, over grad_y spread s apart (depthwise_blocked.h).
inline DwGeom flipped_geom(const DwGeom& g) {
  DwGeom t = g;
  t.H = g.Ho, t.W = g.Wo, t.Ho = g.H, t.Wo = g.W, t.sH = t.sW = 1;
  t.pT = (g.kH - 1) * g.dH - g.pT, t.pL = (g.kW - 1) * g.dW - g.pL;
  t.jin = interior_range(t.Wo, 1, t.pL, t.dW, t.kW, t.W);
  return t;
}

// Each channel's window reversed (tap t <-> K - 1 - t): the input gradient at stride 1 is the
// forward conv of grad_y with these.
template <class T>
std::vector<T> flipped_taps(const T* w, int64_t Cm, int64_t K) {
  std::vector<T> wf(static_cast<size_t>(Cm * K));
  for (int64_t o = 0; o < Cm; ++o)
    for (int64_t t = 0; t < K; ++t) wf[o * K + t] = w[o * K + K - 1 - t];
  return wf;
}

// (C*m, kH*kW) weights -> (kH*kW, C*m): a tap's weights for all channels become one contiguous vector,
// the taps ws >= Cm elements apart (zeros between).
template <class T>
std::vector<T> taps_major(const T* w, int64_t Cm, int64_t K, int64_t ws = -1) {
  if (ws < 0) ws = Cm;
  std::vector<T> wt(static_cast<size_t>(ws * K), T(0));
  for (int64_t o = 0; o < Cm; ++o)
    for (int64_t t = 0; t < K; ++t) wt[t * ws + o] = w[o * K + t];
  return wt;
}

// acc[0..n) += ws[0..n) * x[channel of output c0 + cc] over the taps of pixel (i, j) inside the image.
template <class T, int LEN>
inline void cl_taps_block(const T* xn, const T* wt, const T* bias, T* dst, int64_t c0, int64_t len, int64_t i,
                          int64_t j, TapRange pr, TapRange qr, const DwGeom& g) {
  constexpr int CAP = LEN ? LEN : 128 / sizeof(T);
  const int64_t n = LEN ? LEN : len;
  T acc[CAP];
  for (int64_t cc = 0; cc < n; ++cc) acc[cc] = bias ? bias[c0 + cc] : T(0);
  for (int64_t p = pr.lo; p < pr.hi; ++p) {
    const int64_t ih = i * g.sH - g.pT + p * g.dH;
    for (int64_t q = qr.lo; q < qr.hi; ++q) {
      const int64_t iw = j * g.sW - g.pL + q * g.dW;
      const T* px = xn + (ih * g.W + iw) * g.C;
      const T* ws = wt + (p * g.kW + q) * g.ws + c0;
      for (int64_t cc = 0; cc < n; ++cc) acc[cc] += ws[cc] * px[(c0 + cc) / g.m];
    }
  }
  for (int64_t cc = 0; cc < n; ++cc) dst[c0 + cc] = acc[cc];
}

// All C*m outputs of pixel (i, j) of image xn (H, W, C) into dst[0..C*m), any multiplier; wt from
// taps_major. (Multiplier 1 takes the staged rows below; this serves m > 1.)
template <class T>
void dw_pixel_cl(const T* xn, const T* wt, const T* bias, T* dst, int64_t i, int64_t j, const DwGeom& g) {
  constexpr int CB = 128 / sizeof(T);
  const TapRange pr = tap_range(i, g.sH, g.pT, g.dH, g.kH, g.H);
  const TapRange qr = tap_range(j, g.sW, g.pL, g.dW, g.kW, g.W);
  int64_t c = 0;
  for (; c + CB <= g.Cm; c += CB) cl_taps_block<T, CB>(xn, wt, bias, dst, c, CB, i, j, pr, qr, g);
  if (c < g.Cm) cl_taps_block<T, 0>(xn, wt, bias, dst, c, g.Cm - c, i, j, pr, qr, g);
}

// The cache lines of the input rows that output row i + 1 stages and row i does not (its window
// rows below row i's last one, at most two), under output columns [j0, j1), prefetched a few
// at a time (step) while row i's run [j0, j1) is computed: the ring's copy of them for row i + 1 then
// reads cache while DRAM streamed behind this row's arithmetic. Without it that copy ran alone at
// single-thread DRAM speed (a third of the kernel's time at 8x128x75x75 when it was added; 7 % in
// the kernels of 2026-11-26, whose other changes since overlap part of it); issued all at once, the
// prefetches would stall on the few miss buffers and evict the run's own lines from L1.
// Row stride 2 (two fresh rows for a quarter of the arithmetic per input byte) prefetches only on
// the AVX-512 machine (kAvx512Machine). On the Zen3 the bursts stalled the arithmetic more than they
// overlapped the copy (interleaved, two threads, input from DRAM: 8x96x112x112 s2 2412 us with, 2167
// without; 8x256x38x38 s2 719 / 692); on the Zen5 they pay (two threads, input from DRAM, 3x3 unless
// noted: 8x256x38x38 s2 0.50 -> 0.31-0.36 ms, 8x96x112x112 s2 1.05-1.2 -> 0.76-1.03, 5x5 s2 1.47-1.53
// -> 1.27-1.38; stride 1 unchanged). Stride 1 pays on both (Zen3: 8x128x75x75 2369 us with / 2534
// without, 56x56 5x5 2382 / 2501).
template <class T>
struct NextRowPrefetch {
  LinePrefetch part[2];
  int64_t lines = 0;

  int64_t share(int64_t steps) const { return LinePrefetch::share_of(lines, steps); }

  NextRowPrefetch() = default;  // nothing to prefetch
  NextRowPrefetch(const T* xn, int64_t i, int64_t j0, int64_t j1, const DwGeom& g) {
    if (g.sH > 1 && !(kAvx512Machine && g.sH == 2)) return;
    const int64_t c0 = std::max<int64_t>(0, j0 * g.sW - g.pL) * g.C;
    const int64_t c1 = std::min<int64_t>(g.W, j1 * g.sW - g.pL) * g.C;
    if (c0 >= c1) return;
    // Window rows last - q*dH of row i + 1 below row i's last (last - sH), nearer first.
    const int64_t last = (i + 1) * g.sH - g.pT + (g.kH - 1) * g.dH;
    int np = 0;
    for (int64_t q = g.kH - 1; q >= 0 && np < 2; --q) {
      const int64_t ih = last - (g.kH - 1 - q) * g.dH;
      if (ih <= last - g.sH) break;
      if (ih < 0 || ih >= g.H) continue;
      const T* xrow = xn + ih * g.W * g.C;
      part[np] = LinePrefetch(xrow + c0, xrow + c1);
      lines += part[np++].count();
    }
  }
  // Prefetches the next k lines, the nearer row first.
  void step(int64_t k) {
    for (LinePrefetch& p : part) {
      const int64_t n = std::min(k, p.count());
      p.step(n);
      k -= n;
    }
  }
};

// ---- channels_last forward from rows of pixels (multiplier 1) ----
// The row kernels below read window row p of an output row at rows[p], its pixels ps elements
// apart, from its first window column (input column -pL): either x's own rows, for the pixels whose
// windows lie inside the input, or rows copied, zero-padded, into a thread's ring (ClRowRing; see
// ClRowSource for which). The ring came first: its sequential copy, prefetched while the previous
// row computed, beat register blocks walking kH rows x a few pixels x 64 B of x at once (single
// thread ~8 GB/s on a 38 MB input against ~15 for oneDNN) before those blocks prefetched the next
// row themselves (NextRowPrefetch); its pixel stride keeps a block's window out of a single L1 set
// (cl_ring_pixel_stride), and its padding columns/rows are real zeros, so every block is interior.

// Padded columns an output row reads.
inline int64_t cl_staged_width(const DwGeom& g) { return (g.Wo - 1) * g.sW + (g.kW - 1) * g.dW + 1; }

// Pixel stride of a staged row: C rounded up to whole cache lines, plus one line where that is a
// multiple of 4 lines. A run reads one channel vector of kH x up to 34 pixels; at a stride that is
// a multiple of 4 KiB (1024 float channels, Xception's exit flow) those all fall in one L1 set (8
// ways) and every load went to L2: 7.8 GFLOP/s against 30+ at other widths, one thread, hot cache.
// A stride of 2 x odd lines spreads them over 32 sets, enough, and keeps the ring's rows the input's
// own rows, one memcpy each (96 channels, 8x96x112x112 s2 from DRAM: 2040 us padded to 7 lines,
// 1909 at 6; interleaved, two threads).
template <class T>
int64_t cl_ring_pixel_stride(int64_t C) {
  constexpr int64_t E = 64 / sizeof(T);  // elements per cache line
  const int64_t lines = ceil_div(C, E);
  return (lines % 4 == 0 ? lines + 1 : lines) * E;
}

// g with the taps of the taps-major weights cl_ring_pixel_stride apart where Cm elements are a
// multiple of 2 KiB: there a block's kH*kW weight vectors fall in one or two L1 sets, as the ring's
// pixels did. One thread, ring in L2, 3x3 at 1024 float channels (Xception's exit flow): 4.7 FMAs a
// cycle, 7.9 padded; 512 channels 8.1 -> 9.9; 128-256 channels within +-4 %, so left unpadded.
template <class T>
DwGeom cl_padded(DwGeom g) {
  if (g.Cm * static_cast<int64_t>(sizeof(T)) % 2048 == 0) g.ws = cl_ring_pixel_stride<T>(g.Cm);
  return g;
}

// NJ output pixels j.. x NV vectors of channels c0.. from staged rows (dilation 1 along the row, KW
// column taps and column stride SW known at compile time): pixel jj's tap q reads staged column
// SW*(j + jj) + q, so each input vector of a window row is loaded once and feeds every (pixel, tap)
// pair that reads it, with the row's KW weight vectors in registers: ((NJ - 1) * SW + KW + KW) * NV
// loads per NJ * KW * NV FMAs instead of about one load per FMA.
// STREAM: stored with non-temporal stores (whole lines where the caller has NV vectors make one and
// dst is line-aligned; see cl_streams_rows).
template <class T, int NJ, int NV, int KW, int SW, bool STREAM = false, int B = 32>
inline void cl_staged_block(const T* const* rows, int64_t ps, const T* wt, const T* bias, T* dst, int64_t c0,
                            int64_t j, const DwGeom& g) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::lanes;
  constexpr int U = (NJ - 1) * SW + KW;  // input columns the block reads
  V acc[NJ][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const V b = bias ? vload<T, B>(bias + c0 + v * L) : V{};
#pragma GCC unroll 16
    for (int jj = 0; jj < NJ; ++jj) acc[jj][v] = b;
  }
  for (int64_t p = 0; p < g.kH; ++p) {
    const T* xs = rows[p] + j * SW * ps + c0;
    const T* wr = wt + p * KW * g.ws + c0;
    V wv[KW][NV];
#pragma GCC unroll 8
    for (int q = 0; q < KW; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) wv[q][v] = vload<T, B>(wr + q * g.ws + v * L);
#pragma GCC unroll 64  // whole: U is up to 35 (16 pixels at stride 2, 5 taps)
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const V xv = vload<T, B>(xs + v * L);
#pragma GCC unroll 16
        for (int jj = 0; jj < NJ; ++jj)
          if (u - SW * jj >= 0 && u - SW * jj < KW) acc[jj][v] += wv[u - SW * jj][v] * xv;
      }
      // One pointer stepped by a pixel: without the empty asm GCC precomputes the U column
      // offsets u*ps as loop invariants, which spill (16 GPRs) and turn every load into two.
      xs += ps;
      asm("" : "+r"(xs));
    }
  }
#pragma GCC unroll 16
  for (int jj = 0; jj < NJ; ++jj)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if constexpr (STREAM)
        vstream(dst + jj * g.Cm + c0 + v * L, acc[jj][v]);
      else
        vstore(dst + jj * g.Cm + c0 + v * L, acc[jj][v]);
    }
}

// One 32-byte vector of channels [c, c + L) of pixel j (bias included): g's geometry, or with K > 0 a
// K x K window at column stride and dilation 1 known while compiling (unrolled: the pair seams of
// cl_staged_row_pairs ran 0.90x with the loops at run time, 72 channels).
template <class T, int K = 0>
inline typename Vec<T>::type cl_staged_vector(const T* const* rows, int64_t ps, const T* wt, const T* bias, int64_t c,
                                              int64_t j, const DwGeom& g) {
  using V = typename Vec<T>::type;
  const int64_t kH = K ? K : g.kH, kW = K ? K : g.kW, sW = K ? 1 : g.sW, dW = K ? 1 : g.dW;
  V acc = bias ? vload(bias + c) : V{};
  for (int64_t p = 0; p < kH; ++p)
    for (int64_t q = 0; q < kW; ++q)
      acc += vload(wt + (p * kW + q) * g.ws + c) * vload(rows[p] + (j * sW + q * dW) * ps + c);
  return acc;
}

// Channels [c0, Cm) of pixel j, any geometry: one vector at a time, then the scalar tail.
template <class T>
inline void cl_staged_pixel(const T* const* rows, int64_t ps, const T* wt, const T* bias, T* dst, int64_t c0,
                            int64_t j, const DwGeom& g) {
  constexpr int L = Vec<T>::lanes;
  int64_t c = c0;
  for (; c + L <= g.Cm; c += L) vstore(dst + c, cl_staged_vector(rows, ps, wt, bias, c, j, g));
  for (; c < g.Cm; ++c) {
    T acc = bias ? bias[c] : T(0);
    for (int64_t p = 0; p < g.kH; ++p)
      for (int64_t q = 0; q < g.kW; ++q) acc += wt[(p * g.kW + q) * g.ws + c] * rows[p][(j * g.sW + q * g.dW) * ps + c];
    dst[c] = acc;
  }
}

// A whole output row in blocks of NJ pixels (Wo >= NJ); a last partial block is moved back to end
// at the row's end, recomputing a few pixels with equal values. Output row i of image xn: the
// input rows the next output row stages are prefetched a block ahead, so that the ring's copy of
// them reads L2 while DRAM streams behind this row's arithmetic (the copy alone from DRAM ran at
// half the copy bandwidth per thread, and nothing overlapped it).
template <class T, int NJ, int NV, int KW, int SW, bool STREAM = false, int B = 32>
void cl_staged_row_blocks(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias, T* yr,
                          const DwGeom& g) {
  constexpr int CB = NV * Vec<T, B>::lanes;
  auto group = [&](int64_t j) {
    NextRowPrefetch<T> pf(xn, i, j, j + NJ < g.Wo ? j + NJ : g.Wo + g.kW * g.dW, g);  // (the last group: up to W)
    const int64_t per = pf.share(g.Cm / CB);
    T* dst = yr + j * g.Cm;
    int64_t c = 0;
    for (; c + CB <= g.Cm; c += CB) {
      pf.step(per);
      cl_staged_block<T, NJ, NV, KW, SW, STREAM, B>(rows, ps, wt, bias, dst, c, j, g);
    }
    if constexpr (B == 64 && NV == 1)  // a 32-byte vector left (see cl_staged_row_kw)
      if (c + CB / 2 <= g.Cm) {
        cl_staged_block<T, NJ, 1, KW, SW, false, 32>(rows, ps, wt, bias, dst, c, j, g);
        c += CB / 2;
      }
    pf.step(pf.lines);
    if (c < g.Cm)
      for (int64_t jj = 0; jj < NJ; ++jj) cl_staged_pixel(rows, ps, wt, bias, dst + jj * g.Cm, c, j + jj, g);
  };
  int64_t j = 0;
  for (; j + NJ <= g.Wo; j += NJ) group(j);
  if (j < g.Wo) group(g.Wo - NJ);
}

// 3x3 windows (dilation 1 along the row, column stride SW): one channel vector c of output pixels
// [j0, j1) (j1 - j0 >= NJ) of one output row, NJ pixels at a time, with all nine weight vectors held
// in registers for the whole run (9 weights + 4 accumulators + 1 input of 16 registers). The
// per-block loads of the window-row blocks above (weights, bias, the block's setup) cost as much
// as the 3x3 arithmetic itself: one thread, hot cache, they ran at ~40 GFLOP/s on 3x3 against ~57
// on 5x5, whose blocks do 25 taps per setup.
// DJ = 2: every other pixel, j0, j0 + 2, ... < j1 (see cl_staged_row_pairs); STREAM: non-temporal
// stores (dst line-aligned).
template <class T, int SW, int NJ = 4, int B = 32, int DJ = 1, bool STREAM = false>
inline void cl_sweep3(const T* const* rows, int64_t ps, const T* wt, const T* bias, T* yr, int64_t c, int64_t j0,
                      int64_t j1, const DwGeom& g) {
  constexpr int PS = DJ * SW;  // input columns from one block pixel to the next
  using V = typename Vec<T, B>::type;
  V w[3][3];
#pragma GCC unroll 3
  for (int p = 0; p < 3; ++p)
#pragma GCC unroll 3
    for (int q = 0; q < 3; ++q) w[p][q] = vload<T, B>(wt + (p * 3 + q) * g.ws + c);
  auto block = [&](auto nb, int64_t j) {
    constexpr int NB = decltype(nb)::value;
    constexpr int U = (NB - 1) * PS + 3;  // input columns the block reads
    V acc[NB];
    const V b = bias ? vload<T, B>(bias + c) : V{};
#pragma GCC unroll 8
    for (int jj = 0; jj < NB; ++jj) acc[jj] = b;
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p) {
      const T* xs = rows[p] + j * SW * ps + c;
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        V xv = vload<T, B>(xs);
        opaque(xv);  // one load feeding up to three FMAs, not one folded load per FMA
#pragma GCC unroll 8
        for (int jj = 0; jj < NB; ++jj)
          if (u - PS * jj >= 0 && u - PS * jj < 3) acc[jj] += w[p][u - PS * jj] * xv;
        xs += ps;
        asm("" : "+r"(xs));  // (as in cl_staged_block: keeps the column offsets from spilling)
      }
    }
    T* dst = yr + j * g.Cm + c;
#pragma GCC unroll 8
    for (int jj = 0; jj < NB; ++jj) {
      if constexpr (STREAM)
        vstream(dst + jj * DJ * g.Cm, acc[jj]);
      else
        vstore(dst + jj * DJ * g.Cm, acc[jj]);
    }
  };
  if constexpr (DJ == 1) {
    // Blocks of one width (the caller's, with_sweep_block), the last moved back to end at j1
    // (recomputing a few pixels with equal values): each load instruction then steps by one stride
    // from block to block, which the hardware's stride prefetcher follows. Blocks of mixed widths
    // (balanced_blocks: 17 pixels as 6, 6, 5) ran 1.02-1.08x hot but 0.86-0.95x with the input in L3
    // against 8-wide ones (two threads, interleaved: 4x256x19x19, 2x728x19x19, 8x40x28x28, 8x120x28x28).
    int64_t j = j0;
    for (; j + NJ <= j1; j += NJ) block(std::integral_constant<int, NJ>{}, j);
    if (j < j1) block(std::integral_constant<int, NJ>{}, j1 - NJ);
    return;
  }
  // Every other pixel (DJ = 2), streamed: a moved-back block would store lines twice.
  balanced_blocks<NJ>(0, ceil_div(j1 - j0, int64_t{DJ}), [&](auto nb, int64_t b) { block(nb, j0 + b * DJ); });
}

// f(integral_constant<int, nb>) for the block width cl_sweep3 takes over a run of n >= NJ pixels: of
// NJ down to NJ / 2 + 1, the one that computes the fewest pixels (the last block moved back
// recomputes some), the widest of equals. Blocks of one width keep the stride the prefetcher
// follows (see cl_sweep3); narrower blocks load more input per FMA, so only where they save a quarter
// of the pixels. Against 8 throughout, two threads, Zen4, interleaved, hot / input from DRAM:
// 8x1008x10x10 (two blocks of 5 instead of 8 and one moved back by 6) 0.26 -> 0.22 / 0.34 -> 0.31 ms,
// 8x1040x10x10 0.27 -> 0.23 / 0.33 -> 0.30, 2x728x19x19 (17 interior pixels in 6s) 1.06-1.11x,
// 4x256x19x19 1.09-1.11x / 0.99-1.01x; a 12 % saving (28 pixels in 7s) measured 0.92x hot.
template <int NJ, class F>
DLK_INLINE void with_sweep_block(int64_t n, F&& f) {
  auto cost = [&](int64_t nb) { return ceil_div(n, nb) * nb; };
  int best = NJ;
  for (int nb = NJ - 1; nb > NJ / 2; --nb)
    if (cost(nb) < cost(best)) best = nb;
  if (4 * cost(best) > 3 * cost(NJ)) best = NJ;  // narrower blocks load more per FMA: only for a quarter
  with_count<NJ>(best, [&](auto k) {
    if constexpr (decltype(k)::value > NJ / 2) f(k);
  });
}

// A whole output row of a 3x3 window (cl_sweep3; Wo >= 4) in runs of 32 pixels, each run swept
// once per channel vector: a run's kH x ~34 input pixels stay in L1 across its channel vectors,
// and the next output row's fresh input rows are prefetched run by run (see cl_staged_row_blocks).
template <class T, int SW, int NJ = 4, int B = 32>
void cl_staged_row_sweep3(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias,
                          T* yr, const DwGeom& g) {
  constexpr int64_t JC = 32;
  constexpr int L = Vec<T, B>::lanes;
  for (int64_t j0 = 0; j0 < g.Wo;) {
    const int64_t j1 = g.Wo - (j0 + JC) < NJ ? g.Wo : j0 + JC;  // no run shorter than a block
    NextRowPrefetch<T> pf(xn, i, j0, j1 < g.Wo ? j1 : g.Wo + g.kW * g.dW, g);
    const int64_t per = pf.share(g.Cm / L);
    int64_t c = 0;
    with_sweep_block<NJ>(j1 - j0, [&](auto nb) {
      for (; c + L <= g.Cm; c += L) {
        pf.step(per);
        cl_sweep3<T, SW, decltype(nb)::value, B>(rows, ps, wt, bias, yr, c, j0, j1, g);
      }
    });
    if constexpr (B == 64)  // a 32-byte vector left (see cl_staged_row)
      for (; c + L / 2 <= g.Cm; c += L / 2) cl_sweep3<T, SW, 4, 32>(rows, ps, wt, bias, yr, c, j0, j1, g);
    pf.step(pf.lines);
    if (c < g.Cm)
      for (int64_t j = j0; j < j1; ++j) cl_staged_pixel(rows, ps, wt, bias, yr + j * g.Cm, c, j, g);
    j0 = j1;
  }
}

// A 3x3 output row at column stride 1, streamed, where a pixel's channels are an odd number of half
// lines (pixel_bytes % 64 == 32: 728 floats, Xception's middle flow; 40, 72, 120 in MobileNetV3), so
// that every other pixel starts mid-line and no per-pixel channel vector lines up for all pixels.
// Each pixel's whole lines are its channels [0, Cm - L/2) where it starts on a line, [L/2, Cm) where it
// starts mid-line: the two sets of pixels are swept apart (cl_sweep3 over every other pixel) at their
// own channel offsets and stored non-temporally; the line a pixel that starts on a line shares with
// the next one (its last half vector, the next one's first) goes out whole from two half vectors
// (cl_staged_vector: a 32-byte vector is half a line).
// Only the row piece's end halves, whose lines the neighbouring pixels' writers complete (an edge
// pixel, the next row), are stored plainly. Plain stores everywhere read each output line before
// writing it (write-allocate): a third more traffic for a pass that is otherwise bound by DRAM.
// Against plain stores from whole-row sweeps (a 32-byte vector for the last half line), two threads,
// Zen4, interleaved, input from DRAM at a 31-32 GB/s copy: 8x728x19x19 0.72-0.74 -> 0.54-0.57 ms
// (eager 0.76-0.78, floor 0.52), 8x72x56x56 0.68 -> 0.46 (eager 0.77), hot 0.56 -> 0.42 and 0.52 -> 0.37.
template <class T>
void cl_staged_row_pairs(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias, T* yr,
                         const DwGeom& g) {
  constexpr int L = Vec<T, 64>::lanes, H = L / 2;
  constexpr int64_t JC = 32;
  const int64_t nv = (g.Cm - H) / L;  // whole lines in each pixel
  auto on_line = [&](int64_t j) { return reinterpret_cast<uintptr_t>(yr + j * g.Cm) % 64 == 0; };
  for (int64_t j0 = 0; j0 < g.Wo;) {
    const int64_t j1 = g.Wo - (j0 + JC) < 8 ? g.Wo : j0 + JC;
    NextRowPrefetch<T> pf(xn, i, j0, j1 < g.Wo ? j1 : g.Wo + g.kW * g.dW, g);
    const int64_t per = pf.share(2 * nv);
    const int64_t ja = on_line(j0) ? j0 : j0 + 1, jm = on_line(j0) ? j0 + 1 : j0;  // first of each set
    for (int64_t k = 0; k < nv; ++k) {
      pf.step(per);
      cl_sweep3<T, 1, 8, 64, 2, true>(rows, ps, wt, bias, yr, k * L, ja, j1, g);
      pf.step(per);
      cl_sweep3<T, 1, 8, 64, 2, true>(rows, ps, wt, bias, yr, k * L + H, jm, j1, g);
    }
    pf.step(pf.lines);
    if (jm == 0) vstore(yr, cl_staged_vector<T, 3>(rows, ps, wt, bias, 0, 0, g));  // the piece's first pixel's head
    for (int64_t j = ja; j < j1; j += 2) {
      alignas(64) T line[L];  // pixel j's last half vector, pixel j + 1's first
      vstore(line, cl_staged_vector<T, 3>(rows, ps, wt, bias, g.Cm - H, j, g));
      if (j + 1 == g.Wo) {  // the piece's last pixel
        std::memcpy(yr + (j + 1) * g.Cm - H, line, sizeof(T) * H);
        continue;
      }
      vstore(line + H, cl_staged_vector<T, 3>(rows, ps, wt, bias, 0, j + 1, g));
      vstream(yr + (j + 1) * g.Cm - H, vload<T, 64>(line));
    }
    j0 = j1;
  }
}

// The register blocks for KW column taps at column stride SW (Wo >= 4): eight pixels x one channel
// vector, whose eight independent FMA chains keep both FMA units busy; on rows narrower than
// eight, four pixels x two vectors for 3-wide windows (six weights + eight accumulators fit the 16
// registers; five weight vectors of a 5-wide window leave room for one). AVX-512 builds take
// 64-byte vectors where they tile the channels, in blocks of 8-16 pixels (with_pixel_block): half
// the instructions for the same FMAs, which is what bounds 5x5 at stride 1 (Zen5, two threads,
// interleaved, input from DRAM, 8-pixel blocks: 8x144x56x56
// 1.19 -> 0.94 ms, 8x128x56x56 1.05 -> 0.84; rows under 8 pixels in 4-pixel blocks: 8x1152x7x7
// 0.31 -> 0.26, 8x240x14x14 s2 0.109 -> 0.093; stride 2 at 56x56, memory-bound, unchanged; 40
// channels, two vectors and a half-vector tail per pixel, 0.11 -> 0.13, hence whole vectors only).
// f(NJ) for the pixel-block width of a channels-last row of Wo outputs in 64-byte vectors (AVX-512):
// 12, 14 or 16 pixels, whichever computes the fewest pixels over the row (the last block moved back),
// 8 under 12. Each pixel of a block is an FMA chain, and a chain takes KW taps of a window row in a
// row, so 8 pixels left the FMA units waiting on the chains' 4-cycle latency. Interleaved, two
// threads, input from DRAM, forward against 8-pixel blocks: 8x144x56x56 5x5 0.77 -> 0.68 ms (12: 0.74,
// 16: 0.75), 3x3 0.49 -> 0.45; 8x128x75x75 3x3 0.96 -> 0.86 (16; 14: 0.87, 12: 0.90); fused separable
// 8x144x56x56 5x5 -> 24 1.39 -> 1.29.
template <class F>
DLK_INLINE void with_pixel_block(int64_t Wo, F&& f) {
  auto cost = [&](int64_t nj) { return nj <= Wo ? ceil_div(Wo, nj) * nj : INT64_MAX; };
  if (Wo < 12) return f(std::integral_constant<int, 8>{});
  if (cost(16) <= cost(14) && cost(16) <= cost(12)) return f(std::integral_constant<int, 16>{});
  if (cost(14) <= cost(12)) return f(std::integral_constant<int, 14>{});
  f(std::integral_constant<int, 12>{});
}

template <class T, int KW, int SW>
void cl_staged_row_kw(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias, T* yr,
                      const DwGeom& g) {
  // At stride 1 also where the channels end in half a 64-byte vector (72, 120: MobileNetV3's 5x5
  // layers), the rest one 32-byte vector per block, as cl_staged_row_sweep3 does for 3x3. Against
  // 32-byte blocks throughout, two threads, Zen4, interleaved, input from DRAM: 5x5 32x120x28x28 1.81
  // -> 1.49 ms (eager 1.82; hot 1.76 -> 1.43, eager 1.38), 8x72x56x56 0.89 -> 0.85 (hot 0.84 -> 0.75),
  // 7x7 8x120x56x56 2.57 -> 2.30; 8x40x112x112 (two and a half lines) unchanged.
  const bool half_tail = SW == 1 && g.Wo >= 8 && half_line_tail<T>(g.Cm) && g.Cm * static_cast<int64_t>(sizeof(T)) > 64;
  if (wide_pixels<T>(g.Cm) || half_tail) {
    if (g.Wo >= 8)
      return with_pixel_block(g.Wo, [&](auto NJ) {
        cl_staged_row_blocks<T, decltype(NJ)::value, 1, KW, SW, false, 64>(rows, ps, xn, i, wt, bias, yr, g);
      });
    // Rows of 5-7 pixels in one block of the row's width (4 pixels were 4 chains and a recomputed
    // pixel): 8x768x7x7 7x7 0.284 -> 0.186 ms (eager 0.151), 8x1152x7x7 5x5 0.257 -> 0.172 (0.172).
    if (g.Wo >= 5)
      return with_count<3>(g.Wo - 4, [&](auto k) {
        cl_staged_row_blocks<T, 4 + decltype(k)::value, 1, KW, SW, false, 64>(rows, ps, xn, i, wt, bias, yr, g);
      });
    return cl_staged_row_blocks<T, 4, 1, KW, SW, false, 64>(rows, ps, xn, i, wt, bias, yr, g);
  }
  if (g.Wo >= 8) return cl_staged_row_blocks<T, 8, 1, KW, SW>(rows, ps, xn, i, wt, bias, yr, g);
  cl_staged_row_blocks<T, 4, KW == 3 ? 2 : 1, KW, SW>(rows, ps, xn, i, wt, bias, yr, g);
}

// One output row (Wo x Cm) from staged rows, multiplier 1.
template <class T>
void cl_staged_row(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias, T* yr,
                   const DwGeom& g) {
  if (g.dW == 1 && g.Wo >= 4) {
    // Output pixels a multiple of 4 KiB apart all fall in one L1 set: the sweep's stores of one
    // channel vector to ~10 pixels evict each other before the next vector fills the lines' other
    // halves. Blocks of 5 pixels x two vectors store whole lines instead. 3x3, 1024 float channels,
    // two threads: 10x10 360 -> 289 us, 15x15 753 -> 615, 20x20 1436 -> 1134, 2048 channels 10x10
    // 391 -> 346; the 4-pixel blocks such rows would need at other widths measured no faster
    // (7x7: 164 vs 186 us), so those keep the sweep.
    if (g.kH == 3 && g.kW == 3 && g.Wo % 5 == 0 && same_l1_set(g.Cm * static_cast<int64_t>(sizeof(T)))) {
      // AVX-512: one 64-byte vector (a whole line) per pixel, 10 pixels a block where the row is a
      // multiple of 10 (10 FMA chains; 10 lines of one set fit the 12-way L1). Zen5, two threads,
      // interleaved, from DRAM, against 5 x two 32-byte vectors: 8x1024x10x10 0.194 -> 0.159 ms (eager
      // 0.230; hot, 0.179 -> 0.147 against eager's 0.131), 32x1024x10x10 0.77 -> 0.56, 8x1024x20x20
      // 0.76 -> 0.62, 8x2048x10x10 0.40 -> 0.31; 15x15 in 5-pixel blocks 0.43 -> 0.39 (10: 0.43).
      if constexpr (kAvx512Machine) {
        if (g.sW == 1 && g.Wo % 10 == 0)
          return cl_staged_row_blocks<T, 10, 1, 3, 1, false, 64>(rows, ps, xn, i, wt, bias, yr, g);
        if (g.sW == 1) return cl_staged_row_blocks<T, 5, 1, 3, 1, false, 64>(rows, ps, xn, i, wt, bias, yr, g);
      }
      if (g.sW == 1) return cl_staged_row_blocks<T, 5, 2, 3, 1>(rows, ps, xn, i, wt, bias, yr, g);
      if (g.sW == 2) return cl_staged_row_blocks<T, 5, 2, 3, 2>(rows, ps, xn, i, wt, bias, yr, g);
    }
    // AVX-512, whole 64-byte vectors of channels: 8 pixels x one 64-byte vector a block (8 FMA chains,
    // 9 weights in registers). Against 4 pixels x one 32-byte vector, interleaved, two threads, hot
    // cache: 1x128x75x75 0.127 -> 0.102 ms, 1x96x112x112 s2 0.096 -> 0.083, 1x256x38x38 s2 0.062 ->
    // 0.047; fused separable, channels-last, Xception entry 4.27 -> 4.08 ms. 8 pixels x one 32-byte
    // vector measured the same as 4 (0.125, 0.095, 0.058).
    //
    // At stride 1 also where the channels end in half a 64-byte vector (728 = 45.5 x 16 floats), the
    // rest one 32-byte vector in 4-pixel blocks, though half the pixels' vectors then straddle two
    // lines: against 4 pixels x one 32-byte vector for all, interleaved, two threads, from DRAM (copy
    // 42 GB/s): 8x728x19x19 0.53 -> 0.42 ms (eager 0.70; hot 0.45 -> 0.36, eager 0.32), 8x232x28x28
    // 0.29 -> 0.25, 8x24x112x112 0.58 -> 0.53, 8x72x56x56 0.38 -> 0.34. At stride 2 they lost
    // (8x40x112x112 0.527 -> 0.546, 8x72x56x56 0.209 -> 0.238), so stride 2 keeps whole vectors only.
    if (g.kH == 3 && g.kW == 3 && g.Wo >= 8 && kAvx512Machine) {
      if (g.sW == 1 && g.Cm * static_cast<int64_t>(sizeof(T)) >= 64)
        return cl_staged_row_sweep3<T, 1, 8, 64>(rows, ps, xn, i, wt, bias, yr, g);
      if (g.sW == 2 && wide_pixels<T>(g.Cm)) return cl_staged_row_sweep3<T, 2, 8, 64>(rows, ps, xn, i, wt, bias, yr, g);
    }
    if (g.kH == 3 && g.kW == 3 && g.sW == 1) return cl_staged_row_sweep3<T, 1>(rows, ps, xn, i, wt, bias, yr, g);
    if (g.kH == 3 && g.kW == 3 && g.sW == 2) return cl_staged_row_sweep3<T, 2>(rows, ps, xn, i, wt, bias, yr, g);
    if (g.kW == 3 && g.sW == 1) return cl_staged_row_kw<T, 3, 1>(rows, ps, xn, i, wt, bias, yr, g);
    if (g.kW == 3 && g.sW == 2) return cl_staged_row_kw<T, 3, 2>(rows, ps, xn, i, wt, bias, yr, g);
    if (g.kW == 5 && g.sW == 1) return cl_staged_row_kw<T, 5, 1>(rows, ps, xn, i, wt, bias, yr, g);
    if (g.kW == 5 && g.sW == 2) return cl_staged_row_kw<T, 5, 2>(rows, ps, xn, i, wt, bias, yr, g);
    // 7-wide windows at stride 1 (ConvNeXt's 7x7): against the per-pixel kernel, two threads,
    // interleaved, from DRAM: 8x96x56x56 3.41 -> 0.82 ms (eager 1.17), 8x192x28x28 2.57 -> 0.45 (0.78),
    // 8x384x14x14 1.14 -> 0.24 (0.36).
    if (g.kW == 7 && g.sW == 1) return cl_staged_row_kw<T, 7, 1>(rows, ps, xn, i, wt, bias, yr, g);
  }
  for (int64_t j = 0; j < g.Wo; ++j) cl_staged_pixel(rows, ps, wt, bias, yr + j * g.Cm, 0, j, g);
}

// Whether cl_staged_row_pairs streams output rows starting at y (AVX-512; y on a half line, so that
// every other pixel starts on a line).
template <class T>
inline bool cl_row_pairs(const DwGeom& g, const T* y) {
  return half_line_tail<T>(g.Cm) && g.kH == 3 && g.kW == 3 && g.sW == 1 && g.dW == 1 && g.Wo >= 8 &&
         reinterpret_cast<uintptr_t>(y) % 32 == 0;
}

// Whether cl_staged_row_streamed can write output rows starting at y: 3x3 windows at column stride 1
// or 2 (the 5-pixel x 2-vector blocks), or, on the AVX-512 machine, 5-wide windows (and 7-wide at
// stride 1) of 8+ output pixels (8- to 16-pixel blocks of 64-byte vectors); whole 64-byte lines of channels per pixel from a
// line-aligned y, non-temporal stores available. Not where pixels are a multiple of 4 KiB apart
// (1024 float channels): a block's line stores then alias and drain ~2x slower than plain stores
// (two threads, 3x3, 16x1024x10x10: 0.64 ms plain, 1.23 streamed).
template <class T>
bool cl_streams_rows(const DwGeom& g, const T* y) {
#if defined(__AVX__)
  const int64_t pixel_bytes = g.Cm * static_cast<int64_t>(sizeof(T));
  if (cl_row_pairs(g, y)) return true;
  if (g.dW != 1 || g.sW > 2 || pixel_bytes % 64 != 0 || same_l1_set(pixel_bytes) ||
      reinterpret_cast<uintptr_t>(y) % 64 != 0)
    return false;
  return (g.kH == 3 && g.kW == 3 && g.Wo >= 5) || (g.kW == 5 && g.Wo >= 8 && wide_pixels<T>(g.Cm)) ||
         (g.kW == 7 && g.sW == 1 && g.Wo >= 8 && wide_pixels<T>(g.Cm));
#else
  (void)g, (void)y;
  return false;
#endif
}

// One output row stored straight to memory with non-temporal stores, a whole line per pixel and
// block (cl_streams_rows); 3x3 windows in 5-pixel x 2-vector blocks. Where the output goes to DRAM this replaces
// computing the row into a cached buffer and streaming it out afterwards (stream_copy): the stores
// then drain while the next blocks compute, where the separate copy overlapped nothing. Two threads,
// input from DRAM, 3x3: 8x128x75x75 2.23 -> 1.60 ms, 8x96x112x112 s2 1.84 -> 1.55 (and, streaming
// forced where input + output fit the LLC, 8x144x56x56 1.39 -> 1.05, 8x256x38x38 s2 0.64 -> 0.58).
// With the buffer instead, these blocks were ~5 % slower than cl_staged_row's choice.
// At stride 1 on the AVX-512 machine, rows of 8+ pixels take 8- to 16-pixel blocks of one 64-byte
// vector (still a whole line per pixel and store): where DRAM runs fast (~80 GB/s copy) the 32-byte blocks'
// arithmetic, not memory, bounded the pass (interleaved, two threads, input from DRAM, copy 75-80
// GB/s: 8x128x75x75 0.96 -> 0.79 ms, 8x144x56x56 0.62 -> 0.48, 8x32x112x112 0.63 -> 0.47; at a
// 46 GB/s copy, 16x192x28x28 and 32x384x14x14 within +-3 %). Stride 2 stays in 32-byte blocks: 64-byte
// ones, in 4, 5 or 8 pixels, were 10-20 % slower there (8x96x112x112 0.79 -> 0.93, 8x256x38x38 0.31 ->
// 0.34-0.36), and so were plain stores from 8-pixel blocks. 5-wide windows stream from the 8-pixel
// (now 8-16, with_pixel_block: stride 2 8x240x56x56 0.75 -> 0.67 ms, 8x96x112x112 the same)
// 64-byte blocks cl_staged_row_kw stores plainly (interleaved, two threads, input from DRAM, copy 44
// GB/s: 8x144x56x56 1.01-1.06 -> 0.81 ms, 8x240x28x28 0.53 -> 0.43, 8x32x112x112 0.87 -> 0.67; stride 2
// 8x96x112x112 1.38 -> 1.18, 8x240x56x56 0.94 -> 0.81).
template <class T>
void cl_staged_row_streamed(const T* const* rows, int64_t ps, const T* xn, int64_t i, const T* wt, const T* bias,
                            T* yr, const DwGeom& g) {
  if constexpr (kAvx512Machine)
    if (cl_row_pairs(g, yr)) return cl_staged_row_pairs(rows, ps, xn, i, wt, bias, yr, g);
  // 7-wide windows (ConvNeXt's 7x7) the same way: two threads, interleaved, from DRAM, against plain
  // stores: 8x96x56x56 0.86 -> 0.76 ms (eager 1.19), 16x96x56x56 1.64 -> 1.52.
  if (g.kW == 7)
    return with_pixel_block(g.Wo, [&](auto NJ) {
      cl_staged_row_blocks<T, decltype(NJ)::value, 1, 7, 1, true, 64>(rows, ps, xn, i, wt, bias, yr, g);
    });
  if (g.kW == 5) {
    if (g.sW == 1)
      return with_pixel_block(g.Wo, [&](auto NJ) {
        cl_staged_row_blocks<T, decltype(NJ)::value, 1, 5, 1, true, 64>(rows, ps, xn, i, wt, bias, yr, g);
      });
    return with_pixel_block(g.Wo, [&](auto NJ) {
      cl_staged_row_blocks<T, decltype(NJ)::value, 1, 5, 2, true, 64>(rows, ps, xn, i, wt, bias, yr, g);
    });
  }
  if (g.sW == 1 && g.Wo >= 8 && wide_pixels<T>(g.Cm))
    return with_pixel_block(g.Wo, [&](auto NJ) {
      cl_staged_row_blocks<T, decltype(NJ)::value, 1, 3, 1, true, 64>(rows, ps, xn, i, wt, bias, yr, g);
    });
  if (g.sW == 1) return cl_staged_row_blocks<T, 5, 2, 3, 1, true>(rows, ps, xn, i, wt, bias, yr, g);
  cl_staged_row_blocks<T, 5, 2, 3, 2, true>(rows, ps, xn, i, wt, bias, yr, g);
}

// A thread's ring of staged, zero-padded input rows of one image (channels_last), plus a zero row
// for window rows in the top/bottom padding. Slot ih % R holds input row ih: the (kH-1)*dH + 1
// consecutive rows one output row's window spans map to distinct slots, and consecutive output
// rows reuse the rows they share, so each input row is copied once per run of rows.
template <class T>
struct ClRowRing {
  const DwGeom& g;
  int64_t Wp, ps, R, n = -1;  // padded width, pixel stride (cl_ring_pixel_stride), slots
  std::vector<T> mem;
  T* buf;  // mem's first cache-line boundary: with ps whole lines, no vector load splits a line
  std::vector<int64_t> tag;  // input row held by each slot, -1 none
  ClRowRing(const DwGeom& g_)
      : g(g_), Wp(cl_staged_width(g_)), ps(cl_ring_pixel_stride<T>(g_.C)), R((g_.kH - 1) * g_.dH + 1),
        mem(static_cast<size_t>((R + 1) * Wp * ps + 64 / sizeof(T)), T(0)),
        buf(mem.data() + (64 - reinterpret_cast<uintptr_t>(mem.data()) % 64) % 64 / sizeof(T)),
        tag(static_cast<size_t>(R), -1) {}

  // One pixel's C channels into a slot: in 64-byte vectors where they are whole lines on the AVX-512
  // machine (interleaved, two threads, from DRAM: 8x256x38x38 s2 0.30-0.35 -> 0.28-0.33 ms, 4 of 4
  // pairs; 8x128x75x75 0.85-0.86 -> 0.82-0.83).
  void copy_pixel(T* d, const T* s) const {
    if (wide_pixels<T>(g.C))
      copy_row<T, 64>(d, s, g.C);
    else
      copy_row(d, s, g.C);
  }

  // Window row pointers of output row i of image n (whose input starts at xn).
  void rows_for(const T* xn, int64_t n_, int64_t i, const T** rows) {
    if (n_ != n) std::fill(tag.begin(), tag.end(), -1), n = n_;
    const T* zero = buf + R * Wp * ps;
    const int64_t c_lo = std::min(Wp, std::max<int64_t>(0, g.pL)), c_hi = std::max(c_lo, std::min(Wp, g.W + g.pL));
    for (int64_t p = 0; p < g.kH; ++p) {
      const int64_t ih = i * g.sH - g.pT + p * g.dH;
      if (ih < 0 || ih >= g.H) {
        rows[p] = zero;
        continue;
      }
      const int64_t s = ih % R;
      T* d = buf + s * Wp * ps;
      if (tag[s] != ih) {
        // Only the padding columns are zeroed (the slot's zero columns never change, but a
        // cropped row (negative pL) may leave none), then a sequential copy of the row, pixel by
        // pixel when the ring's stride differs (the channels past C are never read): inline
        // vector copies, since a memcpy call per pixel costs about as much as its copy.
        std::fill(d, d + c_lo * ps, T(0));
        const T* src = xn + (ih * g.W + c_lo - g.pL) * g.C;
        if (ps == g.C)
          std::memcpy(d + c_lo * ps, src, sizeof(T) * (c_hi - c_lo) * g.C);
        else
          for (int64_t c = c_lo; c < c_hi; ++c) copy_pixel(d + c * ps, src + (c - c_lo) * g.C);
        std::fill(d + c_hi * ps, d + Wp * ps, T(0));
        tag[s] = ih;
      }
      rows[p] = d;
    }
  }
};

// Output columns [j0, j1) of g as a geometry of their own: the piece's input column -pL is g's
// padded column j0*sW, so the row kernels, which address a row from its first window column, serve
// part of a row.
inline DwGeom cl_piece(DwGeom g, int64_t j0, int64_t j1) {
  g.pL -= j0 * g.sW;
  g.Wo = j1 - j0;
  g.jin = interior_range(g.Wo, g.sW, g.pL, g.dW, g.kW, g.W);
  return g;
}

// All Cm outputs of pixel (i, j) of image xn, multiplier 1, over the taps inside the input only (the
// edge pixels of ClRowSource): eight channel vectors at a time where the channels allow, eight
// independent FMA chains, then four, then one (dw_pixel_cl serves any multiplier, a channel at a
// time). Eight against four, interleaved, two threads, from DRAM (copy 43 GB/s), the forward:
// 8x728x19x19 0.428 -> 0.384 ms, 8x1024x10x10 0.168 -> 0.157, 8x144x56x56 5x5 0.80 -> 0.75,
// 8x128x75x75 0.98 -> 0.94, 8x256x38x38 s2 0.384 -> 0.367.
template <class T>
void cl_edge_pixel(const T* xn, const T* wt, const T* bias, T* dst, int64_t i, int64_t j, const DwGeom& g) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const TapRange pr = tap_range(i, g.sH, g.pT, g.dH, g.kH, g.H);
  const TapRange qr = tap_range(j, g.sW, g.pL, g.dW, g.kW, g.W);
  const int64_t col0 = j * g.sW - g.pL;  // input column of tap 0
  auto block = [&](auto nv, int64_t c) {
    constexpr int NV = decltype(nv)::value;
    V acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = bias ? vload(bias + c + v * L) : V{};
    for (int64_t p = pr.lo; p < pr.hi; ++p) {
      const T* xr = xn + (i * g.sH - g.pT + p * g.dH) * g.W * g.C + c;  // the row: col0 may be < 0
      for (int64_t q = qr.lo; q < qr.hi; ++q) {
        const T *xs = xr + (col0 + q * g.dW) * g.C, *ws = wt + (p * g.kW + q) * g.ws + c;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[v] += vload(ws + v * L) * vload(xs + v * L);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(dst + c + v * L, acc[v]);
  };
  int64_t c = 0;
  for (; c + 8 * L <= g.Cm; c += 8 * L) block(std::integral_constant<int, 8>{}, c);
  for (; c + 4 * L <= g.Cm; c += 4 * L) block(std::integral_constant<int, 4>{}, c);
  for (; c + L <= g.Cm; c += L) block(std::integral_constant<int, 1>{}, c);
  if (c < g.Cm) cl_taps_block<T, 0>(xn, wt, bias, dst, c, g.Cm - c, i, j, pr, qr, g);  // the tail, < L
}

// Pixels [j0, j1) of output row i (row yr) by cl_edge_pixel: ClRowSource's edge callback.
template <class T>
void cl_edge_pixels(const T* xn, const T* wt, const T* bias, T* yr, int64_t i, int64_t j0, int64_t j1,
                    const DwGeom& g) {
  for (int64_t j = j0; j < j1; ++j) cl_edge_pixel(xn, wt, bias, yr + j * g.Cm, i, j, g);
}

// The input of a thread's channels-last output rows (multiplier 1), one row at a time: where a row
// has 16 or more pixels whose windows lie inside the input and at most 2 that do not, the row
// kernels read the inside ones from x's own rows (pixels C apart, a zero row for window rows in the
// top/bottom padding) and the edge pixels are the caller's to compute exactly (cl_edge_pixel);
// elsewhere whole rows are staged, zero-padded, into a ring (ClRowRing). Staging copied every input
// byte once more through L1 and L2 (the ring's stores, then its reloads), where reading x needs
// only the prefetches the row kernels issue anyway (NextRowPrefetch). Forward, Zen5, two threads,
// input from DRAM, interleaved, ring -> x (eager): at a 40-45 GB/s copy 8x128x75x75 1.05-1.11 ->
// 0.98 ms (1.42-1.44), 8x256x38x38 s2 0.43 -> 0.385-0.394 (0.38), 8x728x19x19 0.53 -> 0.455
// (0.65-0.69), 8x144x56x56 0.65-0.66 -> 0.61-0.63, 5x5 s2 8x96x112x112 1.23-1.27 -> 1.12-1.15,
// 3x3 s2 8x96x112x112 within 3 %; at 77-79 GB/s 8x256x38x38 s2 0.33-0.34 -> 0.25 (0.32). The
// limits: an edge pixel costs several times a block's pixel (its weights are loaded per tap), so
// with 4 of them (5x5 at stride 1) 8x144x56x56 went 0.83-0.86 -> 0.91-1.02 and 8x480x14x14 0.25 ->
// 0.34, and with 2 of 14, 8x384x14x14 0.142 -> 0.154. Not where x's pixels are a multiple of 4 KiB
// apart (1024 float channels: 8x1024x10x10 0.19 -> 0.22; a run's loads then share L1 sets, which
// the ring's pixel stride avoids), nor on the AVX2 machine, where it is not measured.
template <class T>
class ClRowSource {
 public:
  // may_read_x: whether the caller's edge pixels are cheap enough for reading x (see the callers).
  explicit ClRowSource(const DwGeom& g, bool may_read_x = true) : g_(g), gm_(cl_piece(g, g.jin.lo, g.jin.hi)) {
    const int64_t interior = g.jin.hi - g.jin.lo, edges = g.Wo - interior;
    direct_ = may_read_x && kAvx512Machine && g.m == 1 && !same_l1_set(g.C * static_cast<int64_t>(sizeof(T))) &&
              interior >= 16 && edges <= 2;
    rows_.resize(static_cast<size_t>(g.kH));
    if (direct_)
      zero_.assign(static_cast<size_t>(cl_staged_width(gm_) * g.C), T(0));
    else
      ring_.reset(new ClRowRing<T>(g_));
  }
  ClRowSource(const ClRowSource&) = delete;  // the ring holds a reference to g_
  ClRowSource& operator=(const ClRowSource&) = delete;

  // Output row i of image n (input at xn): rows(rows, ps, piece, j0) for the output columns [j0, j0 +
  // piece.Wo) read from rows (rows[p]: window row p of column j0 at its first window column, pixels
  // ps apart; piece: their geometry, cl_piece), then edge(j0, j1) for each range of edge columns
  // left to compute (none where whole rows are staged).
  template <class Rows, class Edge>
  void row(const T* xn, int64_t n, int64_t i, Rows&& rows, Edge&& edge) {
    if (!direct_) {
      ring_->rows_for(xn, n, i, rows_.data());
      return rows(rows_.data(), ring_->ps, g_, int64_t(0));
    }
    for (int64_t p = 0; p < g_.kH; ++p) {
      const int64_t ih = i * g_.sH - g_.pT + p * g_.dH;
      rows_[p] = ih < 0 || ih >= g_.H ? zero_.data() : xn + (ih * g_.W - gm_.pL) * g_.C;  // gm_.pL <= 0
    }
    rows(rows_.data(), g_.C, gm_, g_.jin.lo);
    if (g_.jin.lo > 0) edge(int64_t(0), g_.jin.lo);
    if (g_.jin.hi < g_.Wo) edge(g_.jin.hi, g_.Wo);
  }

 private:
  const DwGeom g_, gm_;  // the whole row, its interior
  bool direct_ = false;
  std::unique_ptr<ClRowRing<T>> ring_;
  std::vector<T> zero_;
  std::vector<const T*> rows_;
};

// The depthwise forward of dlkernels._C.depthwise_fwd (depthwise.cpp) on dense x and y (NCHW, or
// channels_last with cl), for other kernels' use (the fused separable conv runs it on a block of
// images into a cache-sized buffer). Runs its own OpenMP team where the pass is large enough.
template <class T>
void depthwise_forward(const T* x, const T* w, const T* bias, T* y, const DwGeom& g, bool cl);

}  // namespace dlk
