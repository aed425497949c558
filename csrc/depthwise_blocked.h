// NCHW depthwise passes on small planes through channel blocks (AVX-512 builds): L channels of one
// image (a 64-byte vector's worth) are transposed into a zero-padded [row][column][L] buffer. The
// forward sums the window there with one FMA per output pixel and tap, each a full vector of L
// channels against the tap's L weights, and transposes the result back into the L output planes; the
// input gradient is that forward over grad_y (spread by the stride, taps flipped); the weight gradient
// transposes grad_y's block too and takes each tap's dot product over the output pixels.
//
// Why: on planes of 7x7 to 14x14 the masked plane sweep (depthwise_masked.h) loads every input vector
// once per tap, 25 line-crossing masked loads (and their mask registers) per vector of 16 outputs
// at 5x5; it ran at ~240 cycles a 7x7 plane (8x1152x7x7 5x5: 0.29 ms on two threads against
// eager's 0.21, the same in cache as from DRAM; every load aligned, still 0.425 of 0.52 ms on one
// thread). oneDNN blocks channels the same way.
#pragma once

#include "depthwise.h"
#include "depthwise_masked.h"

#if defined(__AVX512F__)

#include <immintrin.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

namespace dlk {

template <class T>
using Bv = typename Vec<T, 64>::type;

// The L x L block r (r[i] a row of L lanes) transposed in place: swapping the off-diagonal b x b
// sub-blocks for b = L/2, ..., 1 (row i with bit b clear trades its lanes with bit b set for row
// i + b's lanes with it clear).
// permutex2var indices of one swap step (indices >= L select the second operand): lo takes the
// lanes with bit b clear from the first row and the others from the second's lane - b; hi takes
// lane + b of the first where the bit is clear and the second's own lane where it is set.
template <class I, int L, int B>
struct SwapIndex {
  alignas(64) I lo[L], hi[L];
  constexpr SwapIndex() : lo(), hi() {
    for (int l = 0; l < L; ++l) {
      const bool set = (l & B) != 0;
      lo[l] = set ? L + l - B : l;
      hi[l] = set ? L + l : l + B;
    }
  }
};
template <class I, int L, int B>
inline constexpr SwapIndex<I, L, B> kSwapIndex{};

template <class T>
DLK_INLINE void transpose_block(Bv<T>* r) {
  constexpr int L = Vec<T, 64>::lanes;
  static_for<(L == 16 ? 4 : 3)>([&](auto s) DLK_LAMBDA_INLINE {
    constexpr int b = L >> (decltype(s)::value + 1);
    const auto& idx = kSwapIndex<std::conditional_t<L == 16, int32_t, int64_t>, L, b>;
    for (int i = 0; i < L; ++i) {
      if (i & b) continue;
      if constexpr (L == 16) {
        const __m512i lo = _mm512_load_si512(idx.lo), hi = _mm512_load_si512(idx.hi);
        const __m512 a = reinterpret_cast<__m512>(r[i]), c = reinterpret_cast<__m512>(r[i + b]);
        r[i] = reinterpret_cast<Bv<T>>(_mm512_permutex2var_ps(a, lo, c));
        r[i + b] = reinterpret_cast<Bv<T>>(_mm512_permutex2var_ps(a, hi, c));
      } else {
        const __m512i lo = _mm512_load_si512(idx.lo), hi = _mm512_load_si512(idx.hi);
        const __m512d a = reinterpret_cast<__m512d>(r[i]), c = reinterpret_cast<__m512d>(r[i + b]);
        r[i] = reinterpret_cast<Bv<T>>(_mm512_permutex2var_pd(a, lo, c));
        r[i + b] = reinterpret_cast<Bv<T>>(_mm512_permutex2var_pd(a, hi, c));
      }
    }
  });
}

template <class T>
DLK_INLINE Bv<T> bload_n(const T* p, int64_t n) {  // p[0, n), zeros after (n <= L)
  constexpr int L = Vec<T, 64>::lanes;
  if (n >= L) return vload<T, 64>(p);
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<Bv<T>>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
  else
    return reinterpret_cast<Bv<T>>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p));
}

template <class T>
DLK_INLINE void bstore_n(T* p, Bv<T> v, int64_t n) {  // v's first n lanes to p
  constexpr int L = Vec<T, 64>::lanes;
  if (n >= L) return vstore(p, v);
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), reinterpret_cast<__m512d>(v));
}

// nc (<= L) planes of len elements from src (plane l at src + l*len) as len vectors of L channels,
// pixel f's to dst(f), zero lanes past nc: L pixels at a time, loaded per plane and transposed.
template <class T, class Dst>
DLK_INLINE void to_pixels(const T* src, int64_t len, int64_t nc, Dst dst) {
  constexpr int L = Vec<T, 64>::lanes;
  Bv<T> r[L];
  for (int64_t f0 = 0; f0 < len; f0 += L) {
    const int64_t nf = std::min<int64_t>(L, len - f0);
    for (int l = 0; l < L; ++l) r[l] = l < nc ? bload_n(src + l * len + f0, nf) : Bv<T>{};
    transpose_block<T>(r);
    for (int64_t k = 0; k < nf; ++k) vstore(dst(f0 + k), r[k]);
  }
}

// The staged input's geometry: input (i, j) at (i*uh + pT, j*uw + pL) (uh = uw = 1 but for the input
// gradient's spread grad_y, below); output (i, j) tap (p, q) reads (i*sH + p*dH, j*sW + q*dW); rows and
// columns enough for both, and each input pixel's staged place. pT, pL >= 0.
struct BlockStage {
  int64_t Hb, Wb;
  std::vector<int64_t> pos;  // in elements of a [Hb][Wb][L] buffer
  BlockStage(const DwGeom& g, int L, int64_t uh = 1, int64_t uw = 1)
      : Hb(std::max((g.Ho - 1) * g.sH + (g.kH - 1) * g.dH + 1, (g.H - 1) * uh + g.pT + 1)),
        Wb(std::max((g.Wo - 1) * g.sW + (g.kW - 1) * g.dW + 1, (g.W - 1) * uw + g.pL + 1)),
        pos(static_cast<size_t>(g.H * g.W)) {
    for (int64_t f = 0; f < g.H * g.W; ++f) pos[f] = ((f / g.W * uh + g.pT) * Wb + f % g.W * uw + g.pL) * L;
  }
};

// Whether g's NCHW passes can take the channel blocks (block_sized): multiplier 1, planes of at most
// 16x16 outputs and inputs (the staged and output buffers stay within L1/L2), channels enough for a
// block. The forward takes them (blocked_planes) at strides > 1, windows of 25 taps or more, or planes of at most 8x8, where they beat the masked
// sweep and the staged rows. Alternating runs of both builds, two threads, from DRAM (ms; eager's
// oneDNN in the same runs): 8x1152x7x7 5x5 0.28 -> 0.18 (0.22), 8x672x14x14 5x5 s2 0.38 -> 0.19
// (0.25), 8x672x14x14 5x5 0.44 -> 0.38 (0.39-0.42), 8x480x14x14 5x5 0.32 -> 0.26-0.29 (0.29-0.31),
// 8x512x14x14 3x3 s2 0.24 -> 0.11-0.12 (0.18-0.20), 32x512x7x7 3x3 0.25 -> 0.19 (0.25-0.28),
// 32x512x8x8 0.26 -> 0.19, 8x1152x7x7 3x3 0.155 -> 0.12; but 3x3 at stride 1 on larger planes lost
// (8x1024x10x10 0.187 -> 0.209, 8x256x14x14 0.095 -> 0.119): nine taps do not pay for the two
// transposes there. Without the prefetch below, 5x5 7x7 took 0.23 (one thread in cache: 0.26 against
// the sweep's 0.53).
inline bool block_sized(const DwGeom& g) {
  return g.m == 1 && g.C >= 8 && g.H * g.W <= 256 && g.Ho * g.Wo <= 256 && g.Ho * g.Wo > 0;
}
inline bool blocked_planes(const DwGeom& g) {
  return block_sized(g) && (g.sH > 1 || g.sW > 1 || g.kH * g.kW >= 25 || g.H * g.W <= 64);
}

// One output row's NJ pixels from column j0: acc = bias + sum over taps of w[t] * the staged input.
template <class T, int NJ>
DLK_INLINE void blocked_row(const T* buf, const Bv<T>* wt, Bv<T> b, T* out, int64_t i, int64_t j0, int64_t Wb,
                            const DwGeom& g) {
  constexpr int L = Vec<T, 64>::lanes;
  Bv<T> acc[NJ];
#pragma GCC unroll 8
  for (int k = 0; k < NJ; ++k) acc[k] = b;
  for (int64_t p = 0; p < g.kH; ++p) {
    const T* row = buf + ((i * g.sH + p * g.dH) * Wb + j0 * g.sW) * L;
    for (int64_t q = 0; q < g.kW; ++q) {
      const Bv<T> w = wt[p * g.kW + q];
      const T* s = row + q * g.dW * L;
#pragma GCC unroll 8
      for (int k = 0; k < NJ; ++k) acc[k] += w * vload<T, 64>(s + k * g.sW * L);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < NJ; ++k) vstore(out + k * L, acc[k]);
}

// The forward; with uh, uw > 1 the input gradient of a strided conv (see bwd_input_blocked).
template <class T>
void fwd_blocked(const T* x, const T* w, const T* bias, T* y, const DwGeom& g, int64_t uh = 1, int64_t uw = 1) {
  constexpr int L = Vec<T, 64>::lanes;
  const int64_t K = g.kH * g.kW, HW = g.H * g.W, HoWo = g.Ho * g.Wo, nblk = ceil_div(g.C, int64_t{L});
  const BlockStage st(g, L, uh, uw);
  const int64_t Hb = st.Hb, Wb = st.Wb;
  const std::vector<int64_t>& pos = st.pos;
  // weights and bias per block, tap-major, zero past the last channel
  std::vector<Bv<T>> wt(static_cast<size_t>(nblk * K)), bv(static_cast<size_t>(nblk));
  for (int64_t blk = 0; blk < nblk; ++blk) {
    for (int64_t t = 0; t < K; ++t) {
      alignas(64) T lanes[L] = {};
      for (int l = 0; l < L && blk * L + l < g.C; ++l) lanes[l] = w[(blk * L + l) * K + t];
      wt[blk * K + t] = vload<T, 64>(lanes);
    }
    alignas(64) T lanes[L] = {};
    for (int l = 0; l < L && blk * L + l < g.C && bias; ++l) lanes[l] = bias[blk * L + l];
    bv[blk] = vload<T, 64>(lanes);
  }
#pragma omp parallel if (worth_threads(g.N * g.C * HoWo * K))
  {
    // the padding stays zero: every block writes the same interior positions
    std::unique_ptr<Bv<T>[]> stage(new Bv<T>[Hb * Wb]()), outb(new Bv<T>[ceil_div(HoWo, int64_t{L}) * L]());
    T* buf = reinterpret_cast<T*>(stage.get());
    T* ob = reinterpret_cast<T*>(outb.get());
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.N * nblk; ++task) {
      const int64_t n = task / nblk, blk = task - n * nblk, c0 = blk * L, nc = std::min<int64_t>(L, g.C - c0);
      const T* xb = x + (n * g.C + c0) * HW;
      T* yb = y + (n * g.C + c0) * HoWo;
      // the input of the block two tasks on (its L planes are one run): with the arithmetic this
      // short, a block otherwise waits on DRAM for its lines one block at a time
      if (task + 2 < g.N * nblk) {
        const int64_t t2 = task + 2, n2 = t2 / nblk, c2 = (t2 - n2 * nblk) * L;
        const T* x2 = x + (n2 * g.C + c2) * HW;
        prefetch_lines(x2, x2 + std::min<int64_t>(L, g.C - c2) * HW);
      }
      to_pixels(xb, HW, nc, [&](int64_t f) { return buf + pos[f]; });
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; j += 8)
          with_count<8>(std::min<int64_t>(8, g.Wo - j), [&](auto NJ) {
            blocked_row<T, decltype(NJ)::value>(buf, wt.data() + blk * K, bv[blk], ob + (i * g.Wo + j) * L, i, j,
                                                Wb, g);
          });
      // back: L pixels of L channels at a time, transposed to L planes' runs
      Bv<T> r[L];
      for (int64_t f0 = 0; f0 < HoWo; f0 += L) {
        const int64_t nf = std::min<int64_t>(L, HoWo - f0);
        for (int k = 0; k < L; ++k) r[k] = k < nf ? vload<T, 64>(ob + (f0 + k) * L) : Bv<T>{};
        transpose_block<T>(r);
        for (int64_t l = 0; l < nc; ++l) bstore_n(yb + l * HoWo + f0, r[l], nf);
      }
    }
  }
}

// Whether g's NCHW input gradient takes the channel blocks: as the forward's planes, at stride > 1 or on
// planes of at most 8x8. Alternating runs of both builds, two threads, from DRAM, forward + input
// gradient (ms; eager's in the same runs): 8x512x14x14 3x3 s2 0.61-0.63 -> 0.36-0.45 (0.42-0.44),
// 8x672x14x14 5x5 s2 0.82-0.86 -> 0.62-0.68 (0.59-0.63), 8x1152x7x7 5x5 0.50-0.53 -> 0.38-0.43 (0.50-0.54),
// 32x512x7x7 3x3 0.51-0.59 -> 0.48-0.49 (0.65-0.75); but 8x672x14x14 5x5 at stride 1 0.95-0.97 ->
// 1.10-1.21, so stride 1 on larger planes keeps the masked sweep.
inline bool blocked_input_planes(const DwGeom& g) {
  return block_sized(g) && (g.sH > 1 || g.sW > 1 || g.H * g.W <= 64);
}

// Input gradient, multiplier 1: grad_x(ii) = sum over taps p and outputs i with ii = i*s + p*d - pad of
// w(p) * grad_y(i), which is a stride-1 forward over grad_y spread s apart (zeros between) with the
// taps flipped and padding (k - 1)*d - pad: the forward's blocks with grad_y staged at (i*s + pad', ...).
// Where pad > (k - 1)*d (a negative pad') it declines (false) and the caller takes another path.
template <class T>
bool bwd_input_blocked(const T* gy, const T* w, T* gx, const DwGeom& g) {
  const DwGeom t = flipped_geom(g);
  if (t.pT < 0 || t.pL < 0) return false;
  const std::vector<T> wf = flipped_taps(w, g.C, g.kH * g.kW);
  fwd_blocked(gy, wf.data(), static_cast<const T*>(nullptr), gx, t, g.sH, g.sW);
  return true;
}

// Whether g's NCHW weight gradient takes the channel blocks: as the forward's planes, and blocks
// enough for every thread to hold a few (a block's channels are summed over the whole batch by one
// thread, so no partial sums cross threads). Against the masked dot products and the staged rows,
// alternating runs of both builds, two threads, from DRAM, forward + weight gradient (ms): 3x3
// 32x512x7x7 1.16 -> 0.45-0.48 (eager 0.74-0.78), 8x512x14x14 s2 0.55-0.56 -> 0.28-0.32 (0.44-0.51),
// 32x1024x10x10 2.76-2.92 -> 1.91-1.94; 5x5 8x1152x7x7 0.70-0.72 -> 0.49-0.52, 8x672x14x14 s2
// 0.82-0.85 -> 0.43-0.46; 8x672x14x14 5x5, 8x1024x10x10 and 8x480x14x14 3x3 unchanged, 8x256x14x14
// 3x3 0.25-0.26 -> 0.27 (within the runs' spread).
template <class T>
inline bool blocked_weight_planes(const DwGeom& g, int threads) {
  constexpr int L = Vec<T, 64>::lanes;
  return block_sized(g) && g.N > 0 && ceil_div(g.C, int64_t{L}) >= 2 * threads;
}

// Weight (and bias) gradient, a block of L channels a task over every image: grad_y's block and the
// input's staged block transposed to pixel vectors, then each tap's L-lane dot product over the output
// pixels (four partial sums: two loads a FMA, one FMA a cycle), added per image into double sums.
// Each tap sums only the outputs whose read lies inside the input, never the staged padding: an
// infinite or NaN grad_y meets no padding zero (as torch's float32 kernel; 0 * inf would be NaN).
template <class T>
void bwd_weight_blocked(const T* gy, const T* x, T* gw, T* gb, const DwGeom& g) {
  constexpr int L = Vec<T, 64>::lanes;
  const int64_t K = g.kH * g.kW, HW = g.H * g.W, HoWo = g.Ho * g.Wo, nblk = ceil_div(g.C, int64_t{L});
  const BlockStage st(g, L);
#pragma omp parallel if (worth_threads(g.N * g.C * HoWo * K))
  {
    std::unique_ptr<Bv<T>[]> stage(new Bv<T>[st.Hb * st.Wb]()), gpix(new Bv<T>[HoWo]());
    T* buf = reinterpret_cast<T*>(stage.get());
    T* gpx = reinterpret_cast<T*>(gpix.get());
    std::vector<double> sums(static_cast<size_t>((K + 1) * L));  // [tap][lane], then the bias's
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t c0 = blk * L, nc = std::min<int64_t>(L, g.C - c0);
      std::fill(sums.begin(), sums.end(), 0.0);
      auto add = [&](int64_t k, Bv<T> v) {
        alignas(64) T lanes[L];
        vstore(lanes, v);
        for (int l = 0; l < L; ++l) sums[k * L + l] += lanes[l];
      };
      for (int64_t n = 0; n < g.N; ++n) {
        const T* xb = x + (n * g.C + c0) * HW;
        const T* gyb = gy + (n * g.C + c0) * HoWo;
        if (n + 1 < g.N) {  // the next image's runs: other pages, not guessed by the hardware prefetcher
          prefetch_lines(xb + g.C * HW, xb + g.C * HW + nc * HW);
          prefetch_lines(gyb + g.C * HoWo, gyb + g.C * HoWo + nc * HoWo);
        }
        to_pixels(xb, HW, nc, [&](int64_t f) { return buf + st.pos[f]; });
        to_pixels(gyb, HoWo, nc, [&](int64_t f) { return gpx + f * L; });
        if (gb) {
          Bv<T> a{};
          for (int64_t f = 0; f < HoWo; ++f) a += vload<T, 64>(gpx + f * L);
          add(K, a);
        }
        for (int64_t t = 0; t < K; ++t) {
          const int64_t p = t / g.kW, q = t - p * g.kW;
          const TapRange ri = outputs_inside(p * g.dH, g.sH, g.pT, g.Ho, g.H);
          const TapRange rj = outputs_inside(q * g.dW, g.sW, g.pL, g.Wo, g.W);
          Bv<T> a0{}, a1{}, a2{}, a3{};
          for (int64_t i = ri.lo; i < ri.hi; ++i) {
            const T* xr = buf + ((i * g.sH + p * g.dH) * st.Wb + q * g.dW) * L;
            const T* gr = gpx + i * g.Wo * L;
            const int64_t xs = g.sW * L;
            int64_t j = rj.lo;
            for (; j + 4 <= rj.hi; j += 4) {
              a0 += vload<T, 64>(gr + j * L) * vload<T, 64>(xr + j * xs);
              a1 += vload<T, 64>(gr + (j + 1) * L) * vload<T, 64>(xr + (j + 1) * xs);
              a2 += vload<T, 64>(gr + (j + 2) * L) * vload<T, 64>(xr + (j + 2) * xs);
              a3 += vload<T, 64>(gr + (j + 3) * L) * vload<T, 64>(xr + (j + 3) * xs);
            }
            for (; j < rj.hi; ++j) a0 += vload<T, 64>(gr + j * L) * vload<T, 64>(xr + j * xs);
          }
          add(t, (a0 + a1) + (a2 + a3));
        }
      }
      for (int64_t l = 0; l < nc; ++l) {
        for (int64_t t = 0; t < K; ++t) gw[(c0 + l) * K + t] = static_cast<T>(sums[t * L + l]);
        if (gb) gb[c0 + l] = static_cast<T>(sums[K * L + l]);
      }
    }
  }
}

}  // namespace dlk

#endif  // __AVX512F__
