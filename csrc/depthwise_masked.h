// NCHW depthwise passes over whole small planes in masked 64-byte vectors (AVX-512 builds).
//
// At stride 1 with an output the input's size ("same" padding, the usual depthwise layer), output
// (i, j) reads input (i + p*dH - pT, j + q*dW - pL): in a plane's flat index f = i*W + j that is
// f + offs[t] for every output, the same offset for every tap t. So a whole plane is K flat sweeps,
// one per tap, each a masked load of the shifted plane (lanes whose source falls outside the plane,
// or past its end, masked off; masked lanes do not fault, so no padded copy is needed) and one FMA.
// The staged row kernels (depthwise.h) copy every plane into a zero-padded buffer first and work in
// rows; on planes of 7x7 to 19x19 that staging and the short rows' partial vectors cost more than
// the arithmetic (8x1024x10x10: ~250 cycles per plane measured, where its 900 multiply-adds need
// ~30 cycles of 16-lane FMAs).
// Where the taps' offsets span at most four vectors, the shifted planes come from registers instead
// (register_block: each plane vector loaded once, every tap's source one shift of two of them).
// The input gradient is the same sweep with offsets negated (the transposed conv at stride 1), the
// weight gradient the K masked dot products of grad_y with the shifted planes.
#pragma once

#include "depthwise.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#if defined(__AVX512F__)

namespace dlk {

template <class T>
using PlaneMask = std::conditional_t<sizeof(T) == 4, __mmask16, __mmask8>;

template <class T>
using Zv = typename Vec<T, 64>::type;

// p[0, L) where m has the lane, 0 elsewhere; memory under masked-off lanes is never read.
template <class T>
DLK_INLINE Zv<T> mload(PlaneMask<T> m, const T* p) {
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<Zv<T>>(_mm512_maskz_loadu_ps(m, p));
  else
    return reinterpret_cast<Zv<T>>(_mm512_maskz_loadu_pd(m, p));
}
template <class T>
DLK_INLINE void mstore(T* p, PlaneMask<T> m, Zv<T> v) {
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, m, reinterpret_cast<__m512>(v));
  else
    _mm512_mask_storeu_pd(p, m, reinterpret_cast<__m512d>(v));
}
// acc + a * b on m's lanes, acc elsewhere: only the (output, tap) pairs inside the plane are summed,
// so a grad_y of inf meets no padding zero (0 * inf would be NaN where torch has none).
template <class T>
DLK_INLINE Zv<T> mfma(Zv<T> acc, PlaneMask<T> m, Zv<T> a, Zv<T> b) {
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<Zv<T>>(
        _mm512_mask3_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(acc), m));
  else
    return reinterpret_cast<Zv<T>>(_mm512_mask3_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                                         reinterpret_cast<__m512d>(acc), m));
}

// The taps of an H x W plane read at flat offsets offs[t] = di[t]*W + dj[t], over nv vectors, vector v
// at flat index start(v): v*L, except that with `overlap` (a plane of at least L elements) the last
// one ends at the plane's end, overlapping its neighbour, so that every store is a whole plain vector
// (masked stores to lines not in cache ran ~2x slower than the staged kernels' plain ones).
// mask[t*nv + v] holds the lanes of vector v whose source (i + di[t], j + dj[t]) lies inside the
// plane; live[v] the lanes below H*W.
template <class T>
struct PlaneTaps {
  static constexpr int L = Vec<T, 64>::lanes;
  int64_t W, HW, nv, K, last;  // last: the last vector's start
  std::vector<int64_t> offs, cols;  // each tap's flat offset, and its column offset
  std::vector<PlaneMask<T>> mask, live;

  PlaneTaps(int64_t H, int64_t W, const std::vector<int64_t>& di, const std::vector<int64_t>& dj, bool overlap)
      : W(W), HW(H * W), nv(ceil_div(H * W, L)), K(static_cast<int64_t>(di.size())),
        last(overlap && HW >= L ? HW - L : (nv - 1) * L), offs(di.size()), cols(dj),
        mask(static_cast<size_t>(K * nv), 0), live(static_cast<size_t>(nv), 0) {
    for (int64_t t = 0; t < K; ++t) offs[t] = di[t] * W + dj[t];
    for (int64_t v = 0; v < nv; ++v)
      for (int l = 0; l < L; ++l) {
        const int64_t f = start(v) + l;
        if (f >= HW) break;
        const int64_t i = f / W, j = f % W;
        const auto bit = static_cast<PlaneMask<T>>(PlaneMask<T>(1) << l);
        live[v] |= bit;
        for (int64_t t = 0; t < K; ++t)
          if (i + di[t] >= 0 && i + di[t] < H && j + dj[t] >= 0 && j + dj[t] < W) mask[t * nv + v] |= bit;
      }
  }
  int64_t start(int64_t v) const { return v + 1 < nv ? v * L : last; }
  // mask transposed, [v*K + t]: a vector's masks of all taps side by side (the weight gradient's order)
  std::vector<PlaneMask<T>> by_vector() const {
    std::vector<PlaneMask<T>> m(mask.size());
    for (int64_t t = 0; t < K; ++t)
      for (int64_t v = 0; v < nv; ++v) m[v * K + t] = mask[t * nv + v];
    return m;
  }
};

// Whether g's NCHW passes take the masked plane sweeps: stride 1, output of the input's size, planes
// of at most 7200 / K elements. Interleaved, two threads, from DRAM, forward (input gradient alike)
// against the staged kernels: 3x3 32x512x8x8 0.41 -> 0.24 ms, 8x1024x10x10 0.275 -> 0.21, 8x728x19x19
// 0.56 -> 0.40, 8x256x28x28 0.32 -> 0.28, but 8x128x32x32 0.164 -> 0.182; 5x5 8x1152x7x7 0.44 -> 0.27,
// 8x672x14x14 0.56 -> 0.48, but 8x240x28x28 0.43 -> 0.62 (the staged 5x5 blocks reuse each input
// vector for five rows, the sweep loads it per tap).
inline bool masked_planes(const DwGeom& g) {
  return g.sH == 1 && g.sW == 1 && g.Ho == g.H && g.Wo == g.W && g.H * g.W > 0 && g.H * g.W * g.kH * g.kW <= 7200;
}

// dst[f] = b + sum over taps t < nt of w[t] * src[t][f] for the NB vectors from v0, where src[t] is
// tap t's shifted source plane (its plane pointer + offs) and mrow[t] its mask row; zeros outside.
// The vectors are L apart but for the last, which may overlap its neighbour (PlaneTaps::start), so
// each load is one base pointer a tap plus a constant (or, for the last, one more register): with
// the NB starts as an array the compiler kept them in vector registers and moved each back for its
// address, about as many instructions as the FMAs. Interleaved, two threads, from DRAM (copy 40
// GB/s), forward: 8x728x19x19 0.464 -> 0.413 ms, 8x256x28x28 0.331 -> 0.288, 8x1152x7x7 5x5 0.317
// -> 0.297, 8x1024x10x10 0.211 -> 0.205; the base pointers kept opaque (constant displacements
// rather than a register per vector): 0.49 -> 0.45, 0.35 -> 0.31, 0.30 -> 0.28, 0.27 -> 0.25.
template <class T, int NB>
DLK_INLINE void sweep_block(const PlaneTaps<T>& pt, const T* const* src, const PlaneMask<T>* const* mrow, const T* w,
                            int64_t nt, T b, T* dst, int64_t v0) {
  constexpr int L = PlaneTaps<T>::L;
  Zv<T> acc[NB];
#pragma GCC unroll 8
  for (int k = 0; k < NB; ++k) acc[k] = vbroadcast<T, 64>(b);
  const int64_t f0 = pt.start(v0), last = pt.start(v0 + NB - 1) - f0;
  auto at = [&](int k) { return k + 1 < NB ? k * L : last; };  // vector k's start from f0
  for (int64_t t = 0; t < nt; ++t) {
    const T wt = w[t];
    const PlaneMask<T>* m = mrow[t] + v0;
    const T* s = src[t] + f0;
    asm("" : "+r"(s), "+r"(m));  // (else GCC hoists each vector's base + offset into its own register)
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k) acc[k] += wt * mload<T>(m[k], s + at(k));
  }
#pragma GCC unroll 8
  for (int k = 0; k < NB; ++k) {
    if (pt.HW >= L)
      vstore(dst + f0 + at(k), acc[k]);
    else
      mstore(dst + f0 + at(k), pt.live[v0 + k], acc[k]);
  }
}

// A plane in blocks of 8 vectors, the rest as one block (10x10's 7 vectors in one: as 4 + 1 + 1 + 1 it
// broadcast each weight four times and ran three one-vector loops over the taps). Interleaved, two
// threads, from DRAM, forward: 8x1024x10x10 0.226 -> 0.202 ms, 8x728x19x19 0.418 -> 0.386 (blocks of 4
// and the rest as one: 0.203, 0.409); 32x512x8x8, 8x1152x7x7 5x5, 8x256x28x28 within 3 %.
template <class T>
void sweep_plane(const PlaneTaps<T>& pt, const T* const* src, const PlaneMask<T>* const* mrow, const T* w, int64_t nt,
                 T b, T* dst) {
  int64_t v = 0;
  for (; v + 8 <= pt.nv; v += 8) sweep_block<T, 8>(pt, src, mrow, w, nt, b, dst, v);
  if (v < pt.nv)
    with_count<8>(pt.nv - v, [&](auto NB) { sweep_block<T, decltype(NB)::value>(pt, src, mrow, w, nt, b, dst, v); });
}

// The plane sweep from registers, where every tap reads one source plane (stride 1, multiplier 1 for
// the input gradient). sweep_block loads every (tap, vector) pair from memory, masked: for 3x3, 9
// masked, mostly line-splitting 64-byte loads an output vector, which on Zen4 issue at about one
// per two cycles. Here a block of NB output vectors (at whole-vector flat positions v*L) loads the
// plane's vectors it reads once, X[i] = vector k0 + qmin + i (zeros outside the plane), and each
// tap's source for vector k is two neighbours of them joined by one shift (valignd): a tap at flat
// offset d = q*L + r reads X[k + q - qmin] and X[k + q - qmin + 1] shifted by r, both known while
// compiling once a switch has picked (q - qmin, r). Rows above and below the plane then read zeros
// by themselves; only the columns a tap wraps into need its mask, and that depends on the tap's
// column offset alone, so the taps go by column offset and each class loads one mask per vector,
// not one per tap and vector. Isolated, one thread, in L1, a 10x10 3x3 plane: 144 -> 115 cycles (86
// without masks). Interleaved, two threads, against sweep_plane (copy 32-51 GB/s): forward
// 8x1024x10x10 0.295 -> 0.212 ms from DRAM (hot alike), 8x728x19x19 0.540 -> 0.502, 8x256x28x28
// 0.416 -> 0.372; input gradient with it, fwd+bwd 8x1024x10x10 1.25 -> 1.06; 32x512x8x8 and 5x5 on
// 7x7 and 14x14 planes level (not traced; per-plane overhead and 25 switched taps a plane are the
// suspects). The stride-2 phase planes
// (four source planes, X reloaded per phase) ran 0.76-0.85x of their masked loads (8x256x38x38):
// not used there.
template <class T>
struct RegisterTaps {
  static constexpr int L = Vec<T, 64>::lanes;
  static constexpr int kMaxSpan = 3;  // X holds NB + span + 1 vectors: 12 at NB = 8
  int64_t qmin = 0, span = -1;
  std::vector<int> tap, code;         // the taps by column offset; each one's (q - qmin) * L + r
  std::vector<int64_t> cls;           // column offset class c: tap[cls[c], cls[c + 1])
  std::vector<PlaneMask<T>> colmask;  // [c * pt.nv + v]: lanes of vector v whose tap column is inside

  // pt's taps (colmask by pt.nv vectors a class).
  explicit RegisterTaps(const PlaneTaps<T>& pt) {
    if (pt.nv == 0) return;
    const int64_t W = pt.W, HW = pt.HW;
    const std::vector<int64_t>& dj = pt.cols;
    std::vector<int64_t> cols(dj);
    std::sort(cols.begin(), cols.end());
    cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
    int64_t qmax = std::numeric_limits<int64_t>::min();
    qmin = std::numeric_limits<int64_t>::max();
    for (int64_t t = 0; t < pt.K; ++t) qmin = std::min(qmin, floor_div(pt.offs[t], L)), qmax = std::max(qmax, floor_div(pt.offs[t], L));
    span = qmax - qmin;
    for (const int64_t col : cols) {
      cls.push_back(static_cast<int64_t>(tap.size()));
      for (int64_t t = 0; t < pt.K; ++t)
        if (dj[t] == col) {
          const int64_t q = floor_div(pt.offs[t], L);
          tap.push_back(static_cast<int>(t)), code.push_back(static_cast<int>((q - qmin) * L + pt.offs[t] - q * L));
        }
      for (int64_t v = 0; v < pt.nv; ++v) {
        PlaneMask<T> m = 0;
        for (int l = 0; l < L && v * L + l < HW; ++l) {
          const int64_t j = (v * L + l) % W + col;
          if (j >= 0 && j < W) m = static_cast<PlaneMask<T>>(m | (PlaneMask<T>(1) << l));
        }
        colmask.push_back(m);
      }
    }
    cls.push_back(static_cast<int64_t>(tap.size()));
  }
  bool usable() const { return span >= 0 && span <= kMaxSpan; }
};

// f(integral_constant q, integral_constant r) for code = q * L + r < (SPAN + 1) * L: one jump.
template <int SPAN, int L, class F>
DLK_INLINE void with_shift(int code, F&& f) {
  switch (code) {
#define DLK_SHIFT_CASE(n)                                                                          \
  case (n):                                                                                        \
    if constexpr ((n) < (SPAN + 1) * L) f(std::integral_constant<int, (n) / L>{}, std::integral_constant<int, (n) % L>{}); \
    break;
#define DLK_SHIFT_CASE8(n) DLK_SHIFT_CASE(n) DLK_SHIFT_CASE(n + 1) DLK_SHIFT_CASE(n + 2) DLK_SHIFT_CASE(n + 3) \
  DLK_SHIFT_CASE(n + 4) DLK_SHIFT_CASE(n + 5) DLK_SHIFT_CASE(n + 6) DLK_SHIFT_CASE(n + 7)
    DLK_SHIFT_CASE8(0) DLK_SHIFT_CASE8(8) DLK_SHIFT_CASE8(16) DLK_SHIFT_CASE8(24)
    DLK_SHIFT_CASE8(32) DLK_SHIFT_CASE8(40) DLK_SHIFT_CASE8(48) DLK_SHIFT_CASE8(56)
#undef DLK_SHIFT_CASE8
#undef DLK_SHIFT_CASE
    default: break;
  }
}
static_assert(RegisterTaps<float>::L * (RegisterTaps<float>::kMaxSpan + 1) <= 64, "with_shift's cases");

// Elements [R, R + L) of the pair (lo, hi), zero outside m.
template <class T, int R>
DLK_INLINE Zv<T> shifted(PlaneMask<T> m, __m512i lo, __m512i hi) {
  __m512i s;
  if constexpr (sizeof(T) == 4)
    s = R == 0 ? _mm512_maskz_mov_epi32(m, lo) : _mm512_maskz_alignr_epi32(m, hi, lo, R);
  else
    s = R == 0 ? _mm512_maskz_mov_epi64(m, lo) : _mm512_maskz_alignr_epi64(m, hi, lo, R);
  return reinterpret_cast<Zv<T>>(s);
}

// The first n < L lanes, for a plane's partial last vector.
template <class T>
DLK_INLINE PlaneMask<T> lanes_below(int64_t n) {
  return static_cast<PlaneMask<T>>((PlaneMask<T>(1) << n) - 1);
}

// Output vectors [k0, k0 + NB) of an HW-element output plane, written at dst, from the source plane
// at xp. A partial last vector is stored masked: against sweep_block's overlapping last vector
// (nine masked loads), 8x1024x10x10 0.237 -> 0.212 ms.
template <class T, int NB, int SPAN>
DLK_INLINE void register_block(const PlaneTaps<T>& pt, const RegisterTaps<T>& rt, const T* xp, const T* w, T b, T* dst,
                               int64_t k0) {
  constexpr int L = RegisterTaps<T>::L, NX = NB + SPAN + 1;
  const int64_t HW = pt.HW;
  __m512i X[NX];
  Zv<T> acc[NB];
  static_for<NB>([&](auto k) DLK_LAMBDA_INLINE { acc[k] = vbroadcast<T, 64>(b); });
  static_for<NX>([&](auto i) DLK_LAMBDA_INLINE {
    const int64_t f = (k0 + rt.qmin + i) * L;
    if (f >= 0 && f + L <= HW)
      X[i] = _mm512_loadu_si512(xp + f);
    else if (f >= 0 && f < HW)
      X[i] = reinterpret_cast<__m512i>(mload<T>(lanes_below<T>(HW - f), xp + f));
    else
      X[i] = _mm512_setzero_si512();
  });
  const int64_t classes = static_cast<int64_t>(rt.cls.size()) - 1;
  for (int64_t c = 0; c < classes; ++c) {
    PlaneMask<T> m[NB];
    static_for<NB>([&](auto k) DLK_LAMBDA_INLINE { m[k] = rt.colmask[c * pt.nv + k0 + k]; });
    for (int64_t i = rt.cls[c]; i < rt.cls[c + 1]; ++i) {
      const Zv<T> wt = vbroadcast<T, 64>(w[rt.tap[i]]);
      with_shift<SPAN, L>(rt.code[i], [&](auto Q, auto R) DLK_LAMBDA_INLINE {
        static_for<NB>([&](auto k) DLK_LAMBDA_INLINE {
          acc[k] += wt * shifted<T, decltype(R)::value>(m[k], X[k + Q], X[k + Q + 1]);
        });
      });
    }
  }
  static_for<NB>([&](auto k) DLK_LAMBDA_INLINE {
    const int64_t f = (k0 + k) * L;
    if (f + L <= HW)
      vstore(dst + f, acc[k]);
    else
      mstore(dst + f, lanes_below<T>(HW - f), acc[k]);
  });
}

// A plane's output from registers: blocks of 8 vectors (the last moved back to end at the plane's
// end, rewriting equal values), or one block of them all.
template <class T, int SPAN>
void register_plane_span(const PlaneTaps<T>& pt, const RegisterTaps<T>& rt, const T* xp, const T* w, T b, T* dst) {
  const int64_t G = pt.nv;
  if (G >= 8) {
    int64_t k = 0;
    for (; k + 8 <= G; k += 8) register_block<T, 8, SPAN>(pt, rt, xp, w, b, dst, k);
    if (k < G) register_block<T, 8, SPAN>(pt, rt, xp, w, b, dst, G - 8);
  } else {
    with_count<7>(G, [&](auto NB) { register_block<T, decltype(NB)::value, SPAN>(pt, rt, xp, w, b, dst, 0); });
  }
}

// register_plane_span for rt's span.
template <class T>
void register_plane(const PlaneTaps<T>& pt, const RegisterTaps<T>& rt, const T* xp, const T* w, T b, T* dst) {
  switch (rt.span) {
    case 0: return register_plane_span<T, 0>(pt, rt, xp, w, b, dst);
    case 1: return register_plane_span<T, 1>(pt, rt, xp, w, b, dst);
    case 2: return register_plane_span<T, 2>(pt, rt, xp, w, b, dst);
    default: return register_plane_span<T, 3>(pt, rt, xp, w, b, dst);
  }
}

// The taps of g's window as PlaneTaps: sign 1, output (i, j) reads input (i + p*dH - pT, j + q*dW -
// pL) (forward, weight gradient); sign -1, the transposed map (input gradient).
template <class T>
PlaneTaps<T> window_taps(const DwGeom& g, int64_t sign, bool overlap) {
  std::vector<int64_t> di, dj;
  for (int64_t p = 0; p < g.kH; ++p)
    for (int64_t q = 0; q < g.kW; ++q) di.push_back(sign * (p * g.dH - g.pT)), dj.push_back(sign * (q * g.dW - g.pL));
  return PlaneTaps<T>(g.H, g.W, di, dj, overlap);
}
// pt's taps in register form where they fit it (see RegisterTaps), else nothing.
template <class T>
std::optional<RegisterTaps<T>> register_taps(const PlaneTaps<T>& pt) {
  RegisterTaps<T> rt(pt);
  if (!rt.usable()) return std::nullopt;
  return rt;
}

// A thread's staging buffer for sweep_planes: `scratch` zeros, and the source plane it holds.
template <class T>
struct PlaneScratch {
  std::vector<T> buf;
  const T* holds = nullptr;
};

// Sweeps `planes` output planes of pt's size, nt taps each (pt's K taps, repeated per source plane):
// plane(p, src, sc) fills src[0, nt) with the shifted source of each tap (staged into the thread's
// sc, `scratch` elements zeroed once, where it stages them), prefetches ahead and returns
// {weights, bias, destination}. rt: pt's taps in register form (register_taps), which then sweep each
// plane from registers (register_plane) instead of the masked taps' rows.
template <class T, class F>
void sweep_planes(const PlaneTaps<T>& pt, int64_t nt, int64_t planes, F plane, int64_t scratch = 0,
                  const RegisterTaps<T>* rt = nullptr) {
  std::vector<const PlaneMask<T>*> mrow(rt ? 0 : static_cast<size_t>(nt));  // each tap's mask row
  for (size_t t = 0; t < mrow.size(); ++t) mrow[t] = pt.mask.data() + (static_cast<int64_t>(t) % pt.K) * pt.nv;
#pragma omp parallel if (worth_threads(planes * pt.HW * nt))
  {
    std::vector<const T*> src(static_cast<size_t>(nt));
    PlaneScratch<T> sc;
    sc.buf.assign(static_cast<size_t>(scratch), T(0));  // the same positions are staged for every plane
#pragma omp for schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
      const auto [w, b, dst] = plane(p, src.data(), sc);
      if (rt)
        register_plane(pt, *rt, src[0] - pt.offs[0], w, b, dst);  // (every tap reads one plane, src[t] - offs[t])
      else
        sweep_plane(pt, src.data(), mrow.data(), w, nt, b, dst);
    }
  }
}

// The lines of [begin, end), prefetched (into L1, or into L2 where prefetch_into_l2). An asm prefetch:
// GCC dropped LinePrefetch's __builtin_prefetch loop inside the sweep's OpenMP lambda (no instruction
// in the binary).
template <class T>
DLK_INLINE void prefetch_lines(const T* begin, const T* end) {
  const char *a = reinterpret_cast<const char*>(begin), *e = reinterpret_cast<const char*>(end);
  if (prefetch_into_l2())
    for (; a < e; a += 64) asm volatile("prefetcht1 %0" : : "m"(*a));
  else
    for (; a < e; a += 64) asm volatile("prefetcht0 %0" : : "m"(*a));
}

// The plane of `len` elements two after p, prefetched where it lies before `end`: a sweep reads its
// plane K times, tap by tap, and without this its first reads of each line waited on DRAM one plane
// at a time (interleaved, two threads, from DRAM: 32x512x8x8 0.67 -> 0.36 ms, 8x1024x10x10 0.46 ->
// 0.29, 8x728x19x19 0.98 -> 0.46; one, four or eight planes ahead the same). The forwards no longer
// take it: the register sweep and the stride-2 staging read each plane once, front to back, and the
// burst of prefetches lost there (see fwd_masked); the input gradient keeps it.
template <class T>
DLK_INLINE void prefetch_plane_after_next(const T* p, int64_t len, const T* end) {
  if (p + 3 * len <= end) prefetch_lines(p + 2 * len, p + 3 * len);
}

// Forward: output plane (n, o) from input plane (n, o / m).
template <class T>
void fwd_masked(const T* x, const T* w, const T* bias, T* y, const DwGeom& g) {
  const int64_t K = g.kH * g.kW, HW = g.H * g.W;
  const PlaneTaps<T> pt = window_taps<T>(g, 1, true);
  const auto rt = register_taps(pt);
  sweep_planes(pt, K, g.N * g.Cm, [&](int64_t plane, const T** src, PlaneScratch<T>&) {
    const int64_t n = plane / g.Cm, o = plane - n * g.Cm;
    const T* xp = x + (n * g.C + o / g.m) * HW;
    // No prefetch_plane_after_next: with the register sweep (one load per plane vector, in
    // order) it lost (interleaved, two threads, from DRAM, copy 33 GB/s: without it 8x728x19x19
    // 0.49 -> 0.45-0.46 ms, 8x256x28x28 0.39 -> 0.35, 8x1024x10x10 0.206 -> 0.198; 8x8 and 7x7
    // planes level). The input gradient keeps it (fwd+bwd level either way). The register sweep
    // reads the plane through src[0] alone.
    for (int64_t t = 0, nt = rt ? 1 : K; t < nt; ++t) src[t] = xp + pt.offs[t];
    return std::tuple<const T*, T, T*>(w + o * K, bias ? bias[o] : T(0), y + plane * HW);
  }, 0, rt ? &*rt : nullptr);
}

// Stride 2 (dilation 1) on small planes: an output (i, j) reads input (2i + u, 2j + v), u = p - pT,
// v = q - pL, which is element (i + floor(u/2), j + floor(v/2)) of the phase plane holding the input's
// rows of parity u mod 2 and columns of parity v mod 2. Staged into four Ho x Wo planes (zeros where
// no input lands), the conv is the stride-1 masked sweep over them, each tap reading its phase: whole
// 64-byte vectors of the output plane instead of the row kernels' rows of Wo outputs in vectors of
// 16 (a 7x7 output plane: 4 vectors, against 7 rows of a mostly empty vector each). Applies where
// every phase position outside the Ho x Wo plane is padding (the usual same-style padding).
// Interleaved, two threads, from DRAM (copy 47 GB/s), against the staged row kernels (eager): 3x3
// 8x512x14x14 0.425 -> 0.224 ms (0.197), 8x256x38x38 0.477 -> 0.388 (0.551), 8x128x10x10 0.081 ->
// 0.055 (0.054), 32x256x28x28 0.997 -> 0.743 (2.05); 5x5 8x240x28x28 0.301 -> 0.265 (0.329).
struct Phase {
  int64_t shift, parity;  // offset u = 2 * shift + parity
  explicit Phase(int64_t u) : shift(floor_div(u, 2)), parity(u - 2 * floor_div(u, 2)) {}
};

inline bool masked_phase_planes(const DwGeom& g) {
  if (g.sH != 2 || g.sW != 2 || g.dH != 1 || g.dW != 1 || g.Ho * g.Wo == 0 || g.Ho * g.Wo * g.kH * g.kW > 7200)
    return false;
  auto fits = [](int64_t k, int64_t pad, int64_t out, int64_t in) {
    for (int64_t p = 0; p < k; ++p) {
      const Phase ph(p - pad);
      if (ph.shift > 0 && 2 * out + ph.parity < in) return false;  // phase row `out` would hold input
    }
    return true;  // (input rows from 2 * out on are then read by no tap)
  };
  return fits(g.kH, g.pT, g.Ho, g.H) && fits(g.kW, g.pL, g.Wo, g.W);
}

template <class T>
void fwd_masked_s2(const T* x, const T* w, const T* bias, T* y, const DwGeom& g) {
  const int64_t K = g.kH * g.kW, HW = g.H * g.W, OW = g.Ho * g.Wo;
  std::vector<int64_t> di, dj, phase;
  for (int64_t p = 0; p < g.kH; ++p)
    for (int64_t q = 0; q < g.kW; ++q) {
      const Phase u(p - g.pT), v(q - g.pL);
      di.push_back(u.shift), dj.push_back(v.shift), phase.push_back(u.parity * 2 + v.parity);
    }
  const PlaneTaps<T> pt(g.Ho, g.Wo, di, dj, true);
  const int64_t even = std::min(g.Wo, (g.W + 1) / 2), pairs = std::min(g.Wo, g.W / 2);
  sweep_planes(pt, K, g.N * g.Cm, [&](int64_t plane, const T** src, PlaneScratch<T>& sc) {
    const int64_t n = plane / g.Cm, o = plane - n * g.Cm;
    const T* xp = x + (n * g.C + o / g.m) * HW;
    T* P = sc.buf.data();
    for (int64_t t = 0; t < K; ++t) src[t] = P + phase[t] * OW + pt.offs[t];
    const auto out = std::tuple<const T*, T, T*>(w + o * K, bias ? bias[o] : T(0), y + plane * OW);
    if (sc.holds == xp) return out;  // a multiplier's next output channel: the same input plane
    sc.holds = xp;
    // No prefetch_plane_after_next here: its burst of a whole plane's prefetches ahead of the
    // staging loads cost more than it hid (interleaved, two threads, from DRAM, copy 34 GB/s:
    // without it 8x256x38x38 0.63-0.72 -> 0.53-0.58 ms, 32x256x28x28 1.11 -> 0.99; 14x14 and
    // 10x10 planes level). The staging reads each plane front to back, which the hardware follows.
    for (int64_t ih = 0; ih < std::min(g.H, 2 * g.Ho); ++ih) {
      const int64_t a = ih & 1, r = ih >> 1;
      T *e = P + 2 * a * OW + r * g.Wo, *od = e + OW;
      split_even_odd(xp + ih * g.W, e, od, pairs);
      if (even > pairs) e[pairs] = xp[ih * g.W + 2 * pairs];
    }
    return out;
  }, 4 * OW);
}

// Input gradient: grad_x(n, c) = sum over its m output channels o = c*m + r and taps t of
// w[o, t] * grad_y(n, o) shifted by -offs[t] (the outputs that read each input).
template <class T>
void bwd_input_masked(const T* gy, const T* w, T* gx, const DwGeom& g) {
  const int64_t K = g.kH * g.kW, HW = g.H * g.W;
  const PlaneTaps<T> pt = window_taps<T>(g, -1, true);
  // (m > 1: each tap reads m grad_y planes, which register_block's one source plane does not hold)
  const auto rt = g.m == 1 ? register_taps(pt) : std::nullopt;
  sweep_planes(pt, K * g.m, g.N * g.C, [&](int64_t plane, const T** src, PlaneScratch<T>&) {
    const int64_t n = plane / g.C, c = plane - n * g.C;
    const T* gyc = gy + (n * g.Cm + c * g.m) * HW;  // its m grad_y planes, one after another
    prefetch_plane_after_next(gyc, g.m * HW, gy + g.N * g.Cm * HW);
    for (int64_t r = 0; r < g.m; ++r)
      for (int64_t t = 0; t < K; ++t) src[r * K + t] = gyc + r * HW + pt.offs[t];
    // w's rows c*m .. c*m + m - 1 are the K*m weights in src's order
    return std::tuple<const T*, T, T*>(w + c * K * g.m, T(0), gx + plane * HW);
  }, 0, rt ? &*rt : nullptr);
}

// acc[t] += grad_y * x shifted by offs[t0 + t] over the pairs inside the plane, for NT taps, and
// *accb += grad_y where BIAS: one plane's products, every vector of grad_y loaded once for all NT
// taps. The accumulators live in memory (vectors) across the planes of one channel.
// Each tap's plane pointer and a vector's masks side by side (PlaneTaps::by_vector) are set once a plane: read
// per tap and vector through pt, the offsets and mask indices were reloaded and recomputed in the
// loop, five instructions an FMA. Interleaved, two threads, from DRAM (copy 43 GB/s): 8x728x19x19
// 0.82 -> 0.72 ms, 32x512x7x7 1.42 -> 1.28, 8x1152x7x7 5x5 0.61 -> 0.52, 8x256x28x28 0.68 -> 0.62;
// hot, 8x728x19x19 0.50 -> 0.40.
template <class T, int NT, bool BIAS>
DLK_INLINE void plane_dots(const PlaneTaps<T>& pt, const PlaneMask<T>* by_vector, const T* gyp, const T* xp, int64_t t0,
                           Zv<T>* acc, Zv<T>* accb) {
  constexpr int L = PlaneTaps<T>::L;
  Zv<T> a[NT], ab = BIAS ? *accb : Zv<T>{};
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) a[t] = acc[t];
  const T* xs[NT];  // each tap's shifted plane
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) xs[t] = xp + pt.offs[t0 + t];
  const PlaneMask<T>* mv = by_vector + t0;  // vector v's masks of these taps, side by side
  for (int64_t v = 0; v < pt.nv; ++v, mv += pt.K) {
    const Zv<T> gv = mload<T>(pt.live[v], gyp + v * L);
    if (BIAS) ab += gv;
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const PlaneMask<T> m = mv[t];
      a[t] = mfma<T>(a[t], m, gv, mload<T>(m, xs[t] + v * L));
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) acc[t] = a[t];
  if (BIAS) *accb = ab;
}

// Weight (and bias) gradient, one thread per channel: its N planes' products are summed lane-wise
// in T, at most ~512 per lane (as WeightAcc), then in double, so each channel's sums are one
// thread's, in a fixed order.
template <class T>
void bwd_weight_masked(const T* gy, const T* x, T* gw, T* gb, const DwGeom& g) {
  constexpr int L = PlaneTaps<T>::L;
  const int64_t K = g.kH * g.kW, HW = g.H * g.W;
  const PlaneTaps<T> pt = window_taps<T>(g, 1, false);  // (an overlapping vector would count its lanes twice)
  const std::vector<PlaneMask<T>> by_vector = pt.by_vector();
  const int64_t flush_every = std::max<int64_t>(1, 512 / pt.nv);  // planes
  const int64_t group = ceil_div(K, ceil_div(K, 8));              // 9 taps as 5 + 4, not 8 + a lone 1
#pragma omp parallel if (worth_threads(g.N * g.Cm * HW * K))
  {
    std::vector<Zv<T>> acc(static_cast<size_t>(K + 1));  // the taps', then the bias's
    std::vector<double> sums(static_cast<size_t>(K + 1));
    auto flush = [&]() {
      for (int64_t k = 0; k <= K; ++k) {
        T lanes[L];
        vstore(lanes, acc[k]);
        for (int l = 0; l < L; ++l) sums[k] += lanes[l];
        acc[k] = Zv<T>{};
      }
    };
#pragma omp for schedule(static)
    for (int64_t o = 0; o < g.Cm; ++o) {
      std::fill(sums.begin(), sums.end(), 0.0);
      std::fill(acc.begin(), acc.end(), Zv<T>{});
      for (int64_t n = 0; n < g.N; ++n) {
        const T* gyp = gy + (n * g.Cm + o) * HW;
        const T* xp = x + (n * g.C + o / g.m) * HW;
        if (n + 1 < g.N) {  // the next image's planes: other pages, which the hardware prefetcher does not guess
          prefetch_lines(gyp + g.Cm * HW, gyp + g.Cm * HW + HW);
          prefetch_lines(xp + g.C * HW, xp + g.C * HW + HW);
        }
        for (int64_t t0 = 0; t0 < K; t0 += group)
          with_count<8>(std::min(group, K - t0), [&](auto NT) {
            constexpr int nt = decltype(NT)::value;
            if (t0 == 0 && gb)
              plane_dots<T, nt, true>(pt, by_vector.data(), gyp, xp, t0, acc.data() + t0, acc.data() + K);
            else
              plane_dots<T, nt, false>(pt, by_vector.data(), gyp, xp, t0, acc.data() + t0, nullptr);
          });
        if ((n + 1) % flush_every == 0 || n + 1 == g.N) flush();
      }
      for (int64_t t = 0; t < K; ++t) gw[o * K + t] = static_cast<T>(sums[t]);
      if (gb) gb[o] = static_cast<T>(sums[K]);
    }
  }
}

}  // namespace dlk

#endif  // __AVX512F__
