// Depthwise conv2d: forward, backward-input and backward-weight (+ bias), direct convolution in
// both contiguous layouts. NCHW vectorizes along W (a row of one channel), channels_last along C
// (all channels of one pixel). Contract: dlkernels/depthwise/op.py.
#include "depthwise.h"
#include "depthwise_blocked.h"

#include <memory>
#include <tuple>

namespace dlk {
namespace {

// Rows per task so that planes * blocks gives every thread several tasks even for small N*C.
int64_t rows_per_task(int64_t planes, int64_t rows) {
  const int64_t want = 4 * omp_get_max_threads();
  if (planes >= want || rows <= 1) return std::max<int64_t>(rows, 1);
  const int64_t blocks = std::min(rows, ceil_div(want, std::max<int64_t>(planes, 1)));
  return ceil_div(rows, blocks);
}

// Whether a pass of geometry g is worth an OpenMP team (every pass here does about one
// multiply-add per output element and tap).
inline bool dw_parallel(const DwGeom& g) { return worth_threads(g.N * g.Cm * g.Ho * g.Wo * g.kH * g.kW); }

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
// Channels_last forward, multiplier 1, weights w (Cm, kH*kW). Each thread takes one contiguous run of
// output rows, so that consecutive rows share the input rows its ring stages where rows are staged
// (ClRowSource: elsewhere a row's interior reads x itself and its edge pixels are cl_edge_pixel's).
// Where the output is not to stay in cache (streams_outputs), the row kernel stores each output row
// with non-temporal stores where it can (cl_streams_rows). Computing other rows into a thread buffer
// and streaming that out (stream_copy) measured slower than plain stores at every size tried (two
// threads, 3x3: 8-16x728x19x19 0.93-0.96x, 8-32x1024x10x10 0.75-0.83x), so they store plainly.
template <class T>
void fwd_cl_staged(const T* x, const T* w, const T* bias, T* y, const DwGeom& g0) {
  const DwGeom g = cl_padded<T>(g0);
  const std::vector<T> wt = taps_major(w, g.Cm, g.kH * g.kW, g.ws);
  const int64_t row_len = g.Wo * g.Cm;
  const bool stream = cl_streams_rows(g, y) &&
                      streams_outputs((g.N * g.H * g.W * g.C + g.N * g.Ho * row_len) * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel if (dw_parallel(g))
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num(), rows = g.N * g.Ho;
    const int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;
    ClRowSource<T> src(g);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, i = r - n * g.Ho;
      const T* xn = x + n * g.H * g.W * g.C;
      T* yr = y + r * row_len;
      src.row(
          xn, n, i,
          [&](const T* const* rows, int64_t ps, const DwGeom& piece, int64_t j0) {
            if (stream && cl_streams_rows(piece, yr + j0 * g.Cm))
              cl_staged_row_streamed(rows, ps, xn, i, wt.data(), bias, yr + j0 * g.Cm, piece);
            else
              cl_staged_row(rows, ps, xn, i, wt.data(), bias, yr + j0 * g.Cm, piece);
          },
          [&](int64_t j0, int64_t j1) { cl_edge_pixels(xn, wt.data(), bias, yr, i, j0, j1, g); });
    }
    if (stream) stream_fence();
  }
}

// NCHW: planes (or blocks of their rows) per task, each staged and computed in L1 (dw_rows_padded).
// This pass is bound by its arithmetic, not by memory: an image of 128x75x75 takes 0.28 ms (two
// threads) whether it is in cache or comes from DRAM. So streaming its output does not pay: rows
// computed into an L1 buffer and written as whole non-temporal lines (carried across planes, one
// fence) took 2.79 ms against 2.28 at 8x128x75x75 and 1.41 against 1.04 at 8x728x19x19; through the
// same buffer with plain stores, 3.09 and 1.00 (interleaved A/B, two threads, 2026-11-26). Without
// the buffer (2026-11-28, Zen4): each task's rows as one flat range of whole 64-byte lines, a vector
// each, computed from the staged rows (two masked loads a tap where a line wraps to the next row) and
// stored from registers, non-temporal. That loses the FixedTaps kernels' row blocking (an input
// vector loaded once for four rows), and the per-vector tap loads, most splitting a line, cost more
// than the write-allocate reads saved: 3x3 stride 1 8x128x75x75 1.70 -> 2.20 ms, 8x144x56x56 1.01
// -> 1.28, 5x5 1.29 -> 2.87; stride 2 gained only on wide rows, 8x32x224x224 3.24 -> 2.40,
// 8x96x112x112 2.44 -> 2.24, and lost at 28 outputs a row (0.95-0.97x), 5x5 8x96x112x112 2.14 -> 2.57.
template <class T>
void fwd(const T* x, const T* w, const T* bias, T* y, const DwGeom& g, bool cl) {
  const int64_t K = g.kH * g.kW;
#if defined(__AVX512F__)
  if (!cl && blocked_planes(g)) return fwd_blocked(x, w, bias, y, g);  // small planes (depthwise_blocked.h)
  if (!cl && masked_planes(g)) return fwd_masked(x, w, bias, y, g);  // small "same" planes (depthwise_masked.h)
  if (!cl && masked_phase_planes(g)) return fwd_masked_s2(x, w, bias, y, g);  // small planes at stride 2
#endif
  if (!cl) {
    const int64_t rb = rows_per_task(g.N * g.Cm, g.Ho), nb = ceil_div(g.Ho, rb);
#pragma omp parallel if (dw_parallel(g))
    {
      DwScratch<T> buf;
      // The input of task t, prefetched while task t - 1 computes: the staging copy otherwise waits on
      // DRAM alone, between two stretches of arithmetic (8x128x75x75 2.20 -> 1.89 ms, 8x96x112x112 s2
      // 3.11 -> 2.44; interleaved A/B, two threads), where it pays (plane_prefetch_pays; checked here
      // first too, to skip the divisions below).
      const bool prefetch = plane_prefetch_pays<T>(g.H, g.W);
      auto task_input = [&](int64_t t) {
        if (!prefetch || t >= g.N * g.Cm * nb) return LinePrefetch();
        const int64_t plane = nb == 1 ? t : t / nb, blk = t - plane * nb, n = plane / g.Cm, o = plane - n * g.Cm;
        const int64_t i0 = blk * rb;
        if (g.m > 1 && o % g.m != 0) return LinePrefetch();  // the same input plane as task t - 1
        return plane_rows_input(x + (n * g.C + o / g.m) * g.H * g.W, i0, std::min(g.Ho, i0 + rb), g);
      };
#pragma omp for schedule(static)
      for (int64_t t = 0; t < g.N * g.Cm * nb; ++t) {
        // (divisions skipped where they are trivial: they cost on planes of 100 outputs)
        const int64_t plane = nb == 1 ? t : t / nb, blk = t - plane * nb, n = plane / g.Cm, o = plane - n * g.Cm;
        const int64_t i0 = blk * rb, i1 = std::min(g.Ho, i0 + rb);
        const T* xp = x + (n * g.C + (g.m == 1 ? o : o / g.m)) * g.H * g.W;
        dw_rows_padded(xp, w + o * K, bias ? bias[o] : T(0), y + plane * g.Ho * g.Wo + i0 * g.Wo, i0, i1, g, buf,
                       task_input(t + 1));
      }
    }
  } else if (g.m == 1) {
    fwd_cl_staged(x, w, bias, y, g);
  } else {
    const std::vector<T> wt = taps_major(w, g.Cm, K);
#pragma omp parallel for schedule(static) if (dw_parallel(g))
    for (int64_t r = 0; r < g.N * g.Ho; ++r) {
      const int64_t n = r / g.Ho, i = r % g.Ho;
      const T* xn = x + n * g.H * g.W * g.C;
      T* yr = y + r * g.Wo * g.Cm;
      for (int64_t j = 0; j < g.Wo; ++j) dw_pixel_cl(xn, wt.data(), bias, yr + j * g.Cm, i, j, g);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward input, NCHW
// ---------------------------------------------------------------------------------------------
// Column tap q of a stride > 1 conv seen from grad_x: input column jj is read by q from output
// column (jj + pL - q*dW) / sW when that divides, i.e. only by the columns of one phase
// jj = phase + sW*t, and those read output columns t + off, consecutive in t. [lo, hi) are the t
// whose output column exists.
struct ColTap {
  int64_t q, phase, off, lo, hi;
};

std::vector<ColTap> col_taps(const DwGeom& g) {
  std::vector<ColTap> v;
  for (int64_t q = 0; q < g.kW; ++q) {
    const int64_t e = g.pL - q * g.dW;
    const int64_t ph = ((-e) % g.sW + g.sW) % g.sW;
    if (ph >= g.W) continue;
    const int64_t off = (ph + e) / g.sW;  // exact: ph + e is a multiple of sW
    const int64_t len = ceil_div(g.W - ph, g.sW);
    const int64_t lo = std::max<int64_t>(0, -off), hi = std::min(len, g.Wo - off);
    if (lo < hi) v.push_back({q, ph, off, lo, hi});
  }
  return v;
}

// Stride > 1, one grad_x plane as a gather, row by row: each row sums, per (row tap, column tap)
// that reads it, one contiguous run of a grad_y row into one phase of a phase-split row buffer ph
// (column phase + sW*t at ph[phase*seg + t]), which is then interleaved into grad_x. No stores
// land in grad_x more than once and no scatter crosses rows, so planes are independent tasks.
template <class T, int SW>
void bwd_input_plane_gather(const T* gy, const T* w, T* gxp, int64_t n, int64_t c, const DwGeom& g,
                            const std::vector<ColTap>& cols, std::vector<TapOut>& rows, T* ph) {
  const int64_t sW = SW ? SW : g.sW, K = g.kH * g.kW, seg = ceil_div(g.W, sW), whole = g.W / sW;
  for (int64_t i = 0; i < g.H; ++i) {
    taps_reading(i, g.sH, g.pT, g.dH, g.kH, g.Ho, rows);
    std::fill(ph, ph + sW * seg, T(0));
    for (int64_t r = 0; r < g.m; ++r) {
      const int64_t o = c * g.m + r;
      const T* gyp = gy + (n * g.Cm + o) * g.Ho * g.Wo;
      const T* wo = w + o * K;
      for (const TapOut& p : rows) {
        const T* gyr = gyp + p.out * g.Wo;
        for (const ColTap& q : cols) {
          const T wv = wo[p.tap * g.kW + q.q];
          T* d = ph + q.phase * seg;
          const int64_t off = q.off;
#pragma omp simd
          for (int64_t t = q.lo; t < q.hi; ++t) d[t] += wv * gyr[t + off];
        }
      }
    }
    T* gxr = gxp + i * g.W;
    for (int64_t t = 0; t < whole; ++t)
      for (int64_t r = 0; r < sW; ++r) gxr[t * sW + r] = ph[r * seg + t];
    for (int64_t r = 0; whole * sW + r < g.W; ++r) gxr[whole * sW + r] = ph[r * seg + whole];
  }
}

// Stride 1: grad_x is the forward conv of grad_y with the kernel flipped and padding
// (k-1)*d - pad, so it reuses the register-blocked forward row kernel (a gather, no stores per tap).
template <class T>
void bwd_input_nchw_stride1(const T* gy, const T* w, T* gx, const DwGeom& g) {
  const int64_t K = g.kH * g.kW;
  const std::vector<T> wf = flipped_taps(w, g.Cm, K);
  const DwGeom t = flipped_geom(g);
  const int64_t rb = rows_per_task(g.N * g.C, g.H), nb = ceil_div(g.H, rb);
#pragma omp parallel if (dw_parallel(g))
  {
    DwScratch<T> buf;
    std::vector<T> tmp(g.m > 1 ? rb * g.W : 0);
    // the next grad_y plane prefetched while this one computes, as in fwd (planes of 4 KiB and more)
    const bool prefetch = plane_prefetch_pays<T>(g.Ho, g.Wo);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.N * g.C * nb; ++task) {
      const int64_t plane = task / nb, blk = task % nb, n = plane / g.C, c = plane % g.C;
      const int64_t h0 = blk * rb, h1 = std::min(g.H, h0 + rb);
      T* out = gx + plane * g.H * g.W + h0 * g.W;
      for (int64_t r = 0; r < g.m; ++r) {
        const int64_t o = c * g.m + r;
        const T* gyp = gy + (n * g.Cm + o) * g.Ho * g.Wo;
        // grad_y planes follow each other in o = c * m + r order, and the next task's first is the next
        const T* next = gyp + g.Ho * g.Wo;
        const bool pf = prefetch && (r + 1 < g.m || task + 1 < g.N * g.C * nb) && nb == 1;
        dw_rows_padded(gyp, wf.data() + o * K, T(0), r == 0 ? out : tmp.data(), h0, h1, t, buf,
                       pf ? plane_rows_input(next, h0, h1, t) : LinePrefetch());
        if (r > 0)
#pragma omp simd
          for (int64_t j = 0; j < (h1 - h0) * g.W; ++j) out[j] += tmp[j];
      }
    }
  }
}

// Stride > 1, multiplier 1, by phases of grad_x: rows ih = r*sH + a and columns iw = c*sW + b
// receive only the taps (p, q) with (a + pT - p*dH) % sH == 0 and (b + pL - q*dW) % sW == 0, from
// grad_y(r + e_p, c + f_q) where e_p = (a + pT - p*dH) / sH and f_q = (b + pL - q*dW) / sW. So each
// phase is a stride-1 correlation of grad_y with its own taps: grad_y is staged once per plane with
// zero margins for the extreme offsets (rows u <-> grad_y row u + e_min, columns v <-> v + f_min),
// every phase runs the forward row kernel on that buffer with its taps' offsets, and the phases are
// interleaved into grad_x's rows. Each grad_x element is written once, with no bounds checks.
struct BwdPhases {
  int64_t e_min, f_min, Rg, Wg, Rmax, Cmax, K;
  std::vector<int64_t> order, offs, start;  // taps by phase a*sW + b: [start[ph], start[ph + 1])

  explicit BwdPhases(const DwGeom& g) : K(g.kH * g.kW) {
    auto phase = [](int64_t pad, int64_t t, int64_t s) {  // (phase, offset) of tap position t
      const int64_t a = ((t - pad) % s + s) % s;
      return std::pair<int64_t, int64_t>{a, (a + pad - t) / s};
    };
    std::vector<int64_t> pa(g.kH), pe(g.kH), qb(g.kW), qf(g.kW);
    for (int64_t p = 0; p < g.kH; ++p) std::tie(pa[p], pe[p]) = phase(g.pT, p * g.dH, g.sH);
    for (int64_t q = 0; q < g.kW; ++q) std::tie(qb[q], qf[q]) = phase(g.pL, q * g.dW, g.sW);
    e_min = *std::min_element(pe.begin(), pe.end()), f_min = *std::min_element(qf.begin(), qf.end());
    Rmax = ceil_div(g.H, g.sH), Cmax = ceil_div(g.W, g.sW);
    Rg = Rmax + *std::max_element(pe.begin(), pe.end()) - e_min;
    Wg = Cmax + *std::max_element(qf.begin(), qf.end()) - f_min;
    for (int64_t ph = 0; ph < g.sH * g.sW; ++ph) {
      start.push_back(static_cast<int64_t>(order.size()));
      for (int64_t p = 0; p < g.kH; ++p)
        for (int64_t q = 0; q < g.kW; ++q)
          if (pa[p] * g.sW + qb[q] == ph) {
            order.push_back(p * g.kW + q);
            offs.push_back((pe[p] - e_min) * Wg + qf[q] - f_min);
          }
    }
    start.push_back(K);
  }
};

template <class T>
void bwd_input_nchw_phased(const T* gy, const T* w, T* gx, const DwGeom& g) {
  const BwdPhases bp(g);
  // Weights in phase order per channel, so that a phase's taps are one contiguous run.
  std::vector<T> wp(static_cast<size_t>(g.C * bp.K));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t k = 0; k < bp.K; ++k) wp[c * bp.K + k] = w[c * bp.K + bp.order[k]];
  const int64_t stage = bp.Rg * bp.Wg + 64;  // + the flat form's over-read
  // grad_y columns some grad_x element reads (padding wider than the kernel leaves some unread)
  const int64_t ow_lo = std::max<int64_t>(0, bp.f_min), ow_hi = std::max(ow_lo, std::min(g.Wo, bp.f_min + bp.Wg));
  // grad_x rows of whole cache lines (W a multiple of 64 bytes, gx line-aligned) go out with non-temporal
  // stores where grad_x leaves the cache anyway (streams_outputs): plain stores first read every line
  // they write, a third more DRAM traffic. Two threads, grad_y from DRAM, interleaved in one process
  // (Zen4): 3x3 s2 8x96x112x112 3.10 -> 2.12 ms and 4.63 -> 2.82 in a slower moment, 8x32x224x224
  // 4.36 -> 2.67, 8x64x96x96 1.45 -> 1.06; 5x5 s2 8x96x112x112 3.73 -> 2.55, 8x32x224x224 4.84 -> 3.21.
  const bool stream = g.sW == 2 && (g.W * static_cast<int64_t>(sizeof(T))) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(gx) % 64 == 0 &&
                      streams_outputs((g.N * g.C * (g.H * g.W + g.Ho * g.Wo)) * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel if (dw_parallel(g))
  {
    // Zero margins once: every plane has the same layout and copies only its data rows.
    std::vector<T> X(static_cast<size_t>(stage), T(0)), F(static_cast<size_t>(flat_size(bp.Wg)));
    std::vector<T> P(static_cast<size_t>(g.sW * bp.Rmax * bp.Cmax));
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < g.N * g.C; ++plane) {
      const T* gyp = gy + plane * g.Ho * g.Wo;
      for (int64_t u = std::max<int64_t>(0, -bp.e_min); u < std::min(bp.Rg, g.Ho - bp.e_min); ++u)
        copy_row(X.data() + u * bp.Wg + ow_lo - bp.f_min, gyp + (u + bp.e_min) * g.Wo + ow_lo, ow_hi - ow_lo);
      const T* wc = wp.data() + (plane % g.C) * bp.K;
      T* gxp = gx + plane * g.H * g.W;
      for (int64_t a = 0; a < std::min(g.sH, g.H); ++a) {
        const int64_t R = ceil_div(g.H - a, g.sH);
        for (int64_t b = 0; b < std::min(g.sW, g.W); ++b) {
          const int64_t ph = a * g.sW + b, t0 = bp.start[ph], C = ceil_div(g.W - b, g.sW);
          // A phase's share of the next plane's grad_y, prefetched while it computes (the hardware
          // prefetcher alone left its staging waiting on DRAM). Interleaved, two threads, from DRAM
          // (Zen4), with the streamed rows below: 3x3 s2 8x96x112x112 2.18 -> 1.98 ms and 2.51 -> 2.23,
          // 8x32x224x224 2.85 -> 2.56, 8x64x96x96 1.15 -> 1.00; 5x5 s2 8x96x112x112 2.55 -> 2.28.
          LinePrefetch pf;
          if (plane + 1 < g.N * g.C) {
            const int64_t nph = g.sH * g.sW, len = g.Ho * g.Wo;
            pf = LinePrefetch(gyp + len + ph * len / nph, gyp + len + (ph + 1) * len / nph);
          }
          dw_rows_staged(X.data(), bp.Wg, bp.offs.data() + t0, bp.start[ph + 1] - t0, wc + t0, T(0),
                         P.data() + b * bp.Rmax * bp.Cmax, R, C, F.data(), pf);
        }
        for (int64_t r = 0; r < R; ++r) {
          T* d = gxp + (r * g.sH + a) * g.W;
          if (g.sW == 2) {
            const T *pe = P.data() + r * bp.Cmax, *po = P.data() + bp.Rmax * bp.Cmax + r * (g.W / 2);
            if (stream)
              merge_even_odd<T, true>(pe, po, d, ceil_div(g.W, 2), g.W / 2);
            else
              merge_even_odd(pe, po, d, ceil_div(g.W, 2), g.W / 2);
          } else {
            for (int64_t iw = 0; iw < g.W; ++iw)
              d[iw] = P[(iw % g.sW) * bp.Rmax * bp.Cmax + r * ceil_div(g.W - iw % g.sW, g.sW) + iw / g.sW];
          }
        }
      }
    }
    if (stream) stream_fence();
  }
}

template <class T>
void bwd_input_nchw(const T* gy, const T* w, T* gx, const DwGeom& g) {
#if defined(__AVX512F__)
  if (blocked_input_planes(g) && bwd_input_blocked(gy, w, gx, g)) return;  // small planes (depthwise_blocked.h)
  if (masked_planes(g)) return bwd_input_masked(gy, w, gx, g);
#endif
  if (g.sH == 1 && g.sW == 1) return bwd_input_nchw_stride1(gy, w, gx, g);
  if (g.m == 1) return bwd_input_nchw_phased(gy, w, gx, g);
  const auto plane_fn = g.sW == 2 ? bwd_input_plane_gather<T, 2> : bwd_input_plane_gather<T, 0>;
  const std::vector<ColTap> cols = col_taps(g);
#pragma omp parallel if (dw_parallel(g))
  {
    std::vector<TapOut> rows;
    std::vector<T> ph(static_cast<size_t>(g.sW * ceil_div(g.W, g.sW)));
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < g.N * g.C; ++plane)
      plane_fn(gy, w, gx + plane * g.H * g.W, plane / g.C, plane % g.C, g, cols, rows, ph.data());
  }
}

// ---------------------------------------------------------------------------------------------
// backward input, channels_last: a gather per input pixel over the (tap, output) pairs that read it
// ---------------------------------------------------------------------------------------------
template <class T, bool UNIT_M, int LEN>
inline void cl_gather_block(const T* gyn, const T* wt, T* dst, int64_t c0, int64_t len, const std::vector<TapOut>& pl,
                            const std::vector<TapOut>& ql, const DwGeom& g) {
  constexpr int CAP = LEN ? LEN : 128 / sizeof(T);
  const int64_t n = LEN ? LEN : len;
  T acc[CAP];
  for (int64_t cc = 0; cc < n; ++cc) acc[cc] = 0;
  for (const TapOut& p : pl)
    for (const TapOut& q : ql) {
      const T* gys = gyn + (p.out * g.Wo + q.out) * g.Cm;
      const T* ws = wt + (p.tap * g.kW + q.tap) * g.Cm;
      if constexpr (UNIT_M) {
#pragma omp simd
        for (int64_t cc = 0; cc < n; ++cc) acc[cc] += ws[c0 + cc] * gys[c0 + cc];
      } else {
        for (int64_t cc = 0; cc < n; ++cc)
          for (int64_t r = 0; r < g.m; ++r) {
            const int64_t o = (c0 + cc) * g.m + r;
            acc[cc] += ws[o] * gys[o];
          }
      }
    }
  for (int64_t cc = 0; cc < n; ++cc) dst[c0 + cc] = acc[cc];
}

template <class T, bool UNIT_M>
void cl_gather_pixel(const T* gyn, const T* wt, T* dst, const std::vector<TapOut>& pl, const std::vector<TapOut>& ql,
                     const DwGeom& g) {
  constexpr int CB = 128 / sizeof(T);
  int64_t c = 0;
  for (; c + CB <= g.C; c += CB) cl_gather_block<T, UNIT_M, CB>(gyn, wt, dst, c, CB, pl, ql, g);
  if (c < g.C) cl_gather_block<T, UNIT_M, 0>(gyn, wt, dst, c, g.C - c, pl, ql, g);
}

// Multiplier 1: NJ grad_x pixels wi, wi + sW, ... of one column phase that share their column
// taps (ql), pixel jj reading output column q.out + jj, x NV channel vectors from c0. A tap's
// weight vectors are loaded once for the NJ pixels: 1 + 1/NJ loads per FMA instead of 2.
// STREAM: non-temporal stores (each pixel's two vectors are one whole line; see bwd_input_cl).
template <class T, int NJ, int NV, bool STREAM, int B = 32>
inline void cl_gather_pixels_vec(const T* gyn, const T* wt, T* dst, int64_t c0, const std::vector<TapOut>& pl,
                                 const std::vector<TapOut>& ql, const DwGeom& g) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::lanes;
  V acc[NJ][NV];
#pragma GCC unroll 8
  for (int jj = 0; jj < NJ; ++jj)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[jj][v] = V{};
  for (const TapOut& p : pl)
    for (const TapOut& q : ql) {
      const T* gys = gyn + (p.out * g.Wo + q.out) * g.Cm + c0;
      const T* ws = wt + (p.tap * g.kW + q.tap) * g.Cm + c0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const V wv = vload<T, B>(ws + v * L);
#pragma GCC unroll 8
        for (int jj = 0; jj < NJ; ++jj) acc[jj][v] += wv * vload<T, B>(gys + jj * g.Cm + v * L);
      }
    }
#pragma GCC unroll 8
  for (int jj = 0; jj < NJ; ++jj)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T* d = dst + jj * g.sW * g.C + c0 + v * L;
      if constexpr (STREAM)
        vstream(d, acc[jj][v]);
      else
        vstore(d, acc[jj][v]);
    }
}

template <class T, int NJ, bool STREAM>
void cl_gather_pixels(const T* gyn, const T* wt, T* dst, const std::vector<TapOut>& pl, const std::vector<TapOut>& ql,
                      const DwGeom& g) {
  constexpr int L = Vec<T>::lanes;
  int64_t c = 0;
  // AVX-512 builds: one 64-byte vector where AVX2 takes two 32-byte ones (Zen5, two threads,
  // interleaved, stride 2: 8x96x112x112 1.50 -> 1.30 ms, 8x144x56x56 5x5 0.71 -> 0.59, 8x256x38x38
  // 0.33 -> 0.30, 8x672x14x14 5x5 0.244 -> 0.219).
  // Two 64-byte vectors where they fit: with one, a block's NJ = 4 chains left the FMA units waiting
  // on their latency (Zen5, two threads, interleaved, stride 2: 8x96x112x112 1.20 -> 1.08 ms,
  // 8x256x38x38 0.39 -> 0.30, 8x144x56x56 5x5 0.79 -> 0.64, 8x96x112x112 5x5 1.53 -> 1.51).
  if (wide_pixels<T>(g.C))
    for (; c + 4 * L <= g.C; c += 4 * L) cl_gather_pixels_vec<T, NJ, 2, STREAM, 64>(gyn, wt, dst, c, pl, ql, g);
  if (wide_pixels<T>(g.C))
    for (; c + 2 * L <= g.C; c += 2 * L) cl_gather_pixels_vec<T, NJ, 1, STREAM, 64>(gyn, wt, dst, c, pl, ql, g);
  for (; c + 2 * L <= g.C; c += 2 * L) cl_gather_pixels_vec<T, NJ, 2, STREAM>(gyn, wt, dst, c, pl, ql, g);
  // (streamed rows have whole lines of channels: nothing is left here)
  for (; c + L <= g.C; c += L) cl_gather_pixels_vec<T, NJ, 1, false>(gyn, wt, dst, c, pl, ql, g);
  if (c < g.C)
    for (int jj = 0; jj < NJ; ++jj)
      cl_gather_block<T, true, 0>(gyn + jj * g.Cm, wt, dst + jj * g.sW * g.C, c, g.C - c, pl, ql, g);
}

inline bool same_taps(const std::vector<TapOut>& a, const std::vector<TapOut>& b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k].tap != b[k].tap) return false;
  return true;
}

template <class T>
void bwd_input_cl(const T* gy, const T* w, T* gx, const DwGeom& g) {
  const int64_t K = g.kH * g.kW;
  if (g.sH == 1 && g.sW == 1 && g.m == 1) {
    // Multiplier 1, stride 1: the forward on grad_y with the flipped kernel.
    return fwd_cl_staged(gy, flipped_taps(w, g.Cm, K).data(), (const T*)nullptr, gx, flipped_geom(g));
  }
  const std::vector<T> wt = taps_major(w, g.Cm, K);
  const auto pixel = g.m == 1 ? cl_gather_pixel<T, true> : cl_gather_pixel<T, false>;
  // Where grad_x goes to DRAM, the pixel blocks store it with non-temporal stores: a plain store
  // first reads the line (write-allocate), and grad_x is 4x grad_y at stride 2. Two threads,
  // 8x96x112x112 stride 2: 2.66 -> 1.82 ms (eager 2.26). Each pixel's channels must be whole lines
  // from a line-aligned grad_x, and no two of a block's pixels a multiple of 4 KiB apart: their line
  // stores then alias. At 8x256x38x38 stride 2 (pixels of a block 2 KiB apart) 4-pixel blocks
  // streamed took 1.14 ms against 0.73 plain; 2-pixel blocks streamed take 0.68 against 0.81.
  const int64_t pixel_bytes = g.C * static_cast<int64_t>(sizeof(T));
  const bool stream = g.m == 1 && pixel_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(gx) % 64 == 0 &&
                      streams_outputs((g.N * g.Ho * g.Wo * g.Cm + g.N * g.H * g.W * g.C) * static_cast<int64_t>(sizeof(T)));
  auto aliases = [&](int nj) {
    for (int jj = 1; jj < nj; ++jj)
      if (same_l1_set(jj * g.sW * pixel_bytes)) return true;
    return false;
  };
  // blocks of nj pixels (streamed: 2 where 4 would alias, plain 4 where 2 would too)
  const int nj = stream && aliases(4) && !aliases(2) ? 2 : 4;
  const bool streamed = stream && !aliases(nj);
  const auto pixels = !streamed ? cl_gather_pixels<T, 4, false>
                      : nj == 4 ? cl_gather_pixels<T, 4, true> : cl_gather_pixels<T, 2, true>;
#pragma omp parallel if (dw_parallel(g))
  {
    std::vector<TapOut> pl, ql, qe;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < g.N * g.H; ++r) {
      const int64_t n = r / g.H, h = r % g.H;
      taps_reading(h, g.sH, g.pT, g.dH, g.kH, g.Ho, pl);
      const T* gyn = gy + n * g.Ho * g.Wo * g.Cm;
      T* gxr = gx + r * g.W * g.C;
      if (g.m == 1) {
        // Column by phase: nj pixels wi, wi + sW, .. at once where the first and the last take
        // the same taps (then so do those between, and their output columns are consecutive).
        // A tap reads pixel k of the group where 0 <= base + k < Wo: one that misses both ends
        // can still read a pixel between them when Wo <= nj - 2 (a window spanning nearly the
        // whole row), so narrower outputs take the pixels one at a time.
        const bool groups = g.Wo >= nj - 1;
        for (int64_t b = 0; b < std::min(g.sW, g.W); ++b)
          for (int64_t wi = b; wi < g.W;) {
            taps_reading(wi, g.sW, g.pL, g.dW, g.kW, g.Wo, ql);
            const int64_t last = wi + (nj - 1) * g.sW;
            if (groups && last < g.W) {
              taps_reading(last, g.sW, g.pL, g.dW, g.kW, g.Wo, qe);
              if (same_taps(ql, qe)) {
                pixels(gyn, wt.data(), gxr + wi * g.C, pl, ql, g);
                wi += nj * g.sW;
                continue;
              }
            }
            pixel(gyn, wt.data(), gxr + wi * g.C, pl, ql, g);
            wi += g.sW;
          }
      } else {
        for (int64_t wi = 0; wi < g.W; ++wi) {
          taps_reading(wi, g.sW, g.pL, g.dW, g.kW, g.Wo, ql);
          pixel(gyn, wt.data(), gxr + wi * g.C, pl, ql, g);
        }
      }
    }
    if (streamed) stream_fence();
  }
}

// ---------------------------------------------------------------------------------------------
// backward weight (+ bias): per-row sums in T, accumulated across rows and threads in double
// ---------------------------------------------------------------------------------------------
// Exact form, output rows [i0, i1) of one plane: only the (output, tap) pairs inside the input.
template <class T, int SW>
void bwd_weight_rows(const T* gyp, const T* xp, double* gw_o, double* gb_o, int64_t i0, int64_t i1, const DwGeom& g) {
  const int64_t sW = SW ? SW : g.sW;
  for (int64_t i = i0; i < i1; ++i) {
    const TapRange pr = tap_range(i, g.sH, g.pT, g.dH, g.kH, g.H);
    const T* gyr = gyp + i * g.Wo;
    for (int64_t p = pr.lo; p < pr.hi; ++p) {
      const T* xr = xp + (i * g.sH - g.pT + p * g.dH) * g.W - g.pL;
      for (int64_t q = 0; q < g.kW; ++q) {
        const T* xs = xr + q * g.dW;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = g.jin.lo; j < g.jin.hi; ++j) s += gyr[j] * xs[j * sW];
        auto border = [&](int64_t j) {
          const int64_t iw = j * sW - g.pL + q * g.dW;
          if (iw >= 0 && iw < g.W) s += gyr[j] * xs[j * sW];
        };
        for (int64_t j = 0; j < g.jin.lo; ++j) border(j);
        for (int64_t j = g.jin.hi; j < g.Wo; ++j) border(j);
        gw_o[p * g.kW + q] += s;
      }
    }
    if (gb_o) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < g.Wo; ++j) s += gyr[j];
      *gb_o += s;
    }
  }
}

// acc[t] += G[f] * X[offs[t] + f] lane-wise over f < n (a multiple of the vector width) for NT
// taps, and *bacc += G[f] when BIAS: G is read once for all the taps, one register chain each. The
// accumulators are vectors in memory that carry over across blocks and planes of one channel: their
// lanes are summed only at a flush (WeightAcc), which on 10x10 planes cost more than the products
// when done per plane.
template <class T, int NT, bool BIAS, int B>
inline void flat_dots(const T* G, const T* X, const int64_t* offs, int64_t n, T* acc, T* bacc) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::lanes;
  V a[NT + 1];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) a[t] = vload<T, B>(acc + t * L);
  if (BIAS) a[NT] = vload<T, B>(bacc);
  for (int64_t f = 0; f < n; f += L) {
    const V gv = vload<T, B>(G + f);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) a[t] += gv * vload<T, B>(X + offs[t] + f);
    if (BIAS) a[NT] += gv;
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) vstore(acc + t * L, a[t]);
  if (BIAS) vstore(bacc, a[NT]);
}

template <class T, bool BIAS, int B>
void flat_dots_n(const T* G, const T* X, const int64_t* offs, int64_t n, T* acc, T* bacc, int64_t nt) {
  with_count<8>(nt, [&](auto NT) { flat_dots<T, decltype(NT)::value, BIAS, B>(G, X, offs, n, acc, bacc); });
}

// A thread's lane accumulators (K taps + the bias, one vector each) for the B channels of the
// channel block it is running, flushed in double into its partials when the block changes or when
// a lane holds kMaxTerms products: float sums stay short, the long sum over images and blocks is
// in double, and the lane sums run once per block instead of once per plane.
template <class T, int VB = 32>
struct WeightAcc {
  static constexpr int L = Vec<T, VB>::lanes;
  static constexpr int64_t kMaxTerms = 512, B = 16;
  int64_t K, Cm, blk = -1;
  bool bias;
  std::vector<T> v;          // [slot][tap or K for the bias][lane]
  std::vector<int64_t> terms;  // per slot
  WeightAcc(int64_t K_, int64_t Cm_, bool bias_)
      : K(K_), Cm(Cm_), bias(bias_), v(static_cast<size_t>(B * (K_ + 1) * L), T(0)), terms(B, 0) {}

  void flush_slot(int64_t s, double* part) {
    const int64_t o = blk * B + s;
    T* a = v.data() + s * (K + 1) * L;
    if (terms[s] > 0)
      for (int64_t k = 0; k < K + (bias ? 1 : 0); ++k) {
        double sum = 0;
        for (int l = 0; l < L; ++l) sum += a[k * L + l];
        part[k < K ? o * K + k : Cm * K + o] += sum;
      }
    std::fill(a, a + (K + 1) * L, T(0));
    terms[s] = 0;
  }
  void flush(double* part) {
    if (blk >= 0)
      for (int64_t s = 0; s < B; ++s) flush_slot(s, part);
  }
  // Channel o's accumulators, with room for n more products per lane.
  T* ready(int64_t o, int64_t n, double* part) {
    if (o / B != blk) flush(part), blk = o / B;
    const int64_t s = o - blk * B;
    if (terms[s] + n > kMaxTerms) flush_slot(s, part);
    terms[s] += n;
    return v.data() + s * (K + 1) * L;
  }
};

// Whether a[0, n) holds no NaN or infinity (x - x is NaN for those), with four independent chains.
// The tail is one vector ending at n (re-reading up to L - 1 elements) and the lanes are summed as a
// tree: on the 120- and 144-element blocks of 10x10 planes a scalar tail and lane-by-lane sum were
// dependent chains of ~30 adds, and the zeroed accumulator array a `rep stos`: a fifth of the
// weight gradient's time.
template <class T>
bool all_finite(const T* a, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  if (n < L) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] - a[i];
    return s == 0;
  }
  auto d = [&](int64_t k) { return vload(a + k) - vload(a + k); };
  V z0 = d(n - L), z1 = z0 - z0, z2 = z1, z3 = z1;  // (no array: an indexed one lived on the stack)
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) z0 += d(i), z1 += d(i + L), z2 += d(i + 2 * L), z3 += d(i + 3 * L);
  for (; i + L <= n; i += L) z1 += d(i);
  T t[L];
  vstore(t, (z0 + z1) + (z2 + z3));
  for (int h = L / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) t[l] += t[l + h];
  return t[0] == 0;
}

// Weight gradient of one plane, any stride and dilation, in blocks of rb output rows: the input
// rows a block reads are staged into phase planes (DwStage, the forward's layout: tap t of output
// (i, j) at offs[t] + i*Wp + j) and the block's grad_y rows are copied into G with the same row
// stride Wp (zeros in columns Wo..Wp and past the last row), so each tap's sum over the block is
// one flat dot product of two contiguous arrays: no borders, no per-row tails, which on 10x10 or
// 19x19 planes cost more than the products. The zero columns of G meet real inputs that the tap
// does not read, so a block whose copies hold a NaN or an infinity (0 * inf) is redone by the
// exact form, keeping torch's NaN propagation.
template <class T, int VB>
void bwd_weight_plane_staged(const T* gyp, const T* xp, int64_t o, double* part, bool bias, int64_t rb,
                             const DwGeom& g, DwScratch<T>& xs, std::vector<T>& G, WeightAcc<T, VB>& wa,
                             LinePrefetch& next_x, LinePrefetch& next_gy) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t K = g.kH * g.kW;
  const int64_t group = ceil_div(K, ceil_div(K, 8));  // 9 taps as 5 + 4, not 8 + a lone 1
  const int64_t steps = ceil_div(g.Ho, rb) * ceil_div(K, group);
  const int64_t per_x = next_x.share(steps), per_gy = next_gy.share(steps);
  // At column stride > 1 the staging (split_even_odd) takes about as long as the flat dots: a block's
  // share of the next plane's x is prefetched over its staged rows, the flat dots then prefetch what is
  // left (as the forward does, dw_rows_padded). Interleaved, two threads, from DRAM (Zen4): 3x3 s2
  // 8x96x112x112 3.13 -> 2.08 ms and 2.96 -> 2.13 (4.99 -> 3.67 in a slower moment), 8x32x224x224
  // 4.36 -> 3.81, 8x128x76x76 1.78 -> 1.32; 5x5 s2 8x96x112x112 3.43 -> 2.66. Twice that share while
  // staging: 2.34, 3.30, 2.83. Planes under 16 KiB lost (8x256x38x38 0.81 -> 0.85, 1.38 -> 1.45, 1.36
  // -> 1.41), so they keep the flat dots' prefetch only.
  const bool stage_prefetch = g.sW > 1 && g.H * g.W * static_cast<int64_t>(sizeof(T)) >= 16384;
  for (int64_t i0 = 0; i0 < g.Ho; i0 += rb) {
    const int64_t i1 = std::min(g.Ho, i0 + rb), nr = i1 - i0;
    const DwStage& st = xs.stage(g, nr);
    const int64_t Wp = st.Wp, n = ceil_div(nr * Wp, L) * L;
    dw_stage(xp, i0, g, st, xs, stage_prefetch ? &next_x : nullptr, per_x * ceil_div(K, group));
    // G's zero columns are never written; only the slack past this block's rows can hold data.
    for (int64_t i = 0; i < nr; ++i) copy_row(G.data() + i * Wp, gyp + (i0 + i) * g.Wo, g.Wo);
    std::fill(G.data() + nr * Wp, G.data() + n, T(0));
    const T* X = xs.buf.data();
    if (!all_finite(G.data(), nr * Wp) || !all_finite(X, st.nph * st.PB)) {
      double* gb_o = bias ? part + g.Cm * K + o : nullptr;
      if (g.sW == 2)
        bwd_weight_rows<T, 2>(gyp, xp, part + o * K, gb_o, i0, i1, g);
      else
        bwd_weight_rows<T, 0>(gyp, xp, part + o * K, gb_o, i0, i1, g);
      continue;
    }
    T* acc = wa.ready(o, n / L, part);
    for (int64_t t0 = 0; t0 < K; t0 += group) {
      next_x.step(per_x), next_gy.step(per_gy);
      const int64_t nt = std::min<int64_t>(group, K - t0);
      if (t0 == 0 && bias)
        flat_dots_n<T, true, VB>(G.data(), X, st.offs.data() + t0, n, acc + t0 * L, acc + K * L, nt);
      else
        flat_dots_n<T, false, VB>(G.data(), X, st.offs.data() + t0, n, acc + t0 * L, nullptr, nt);
    }
  }
}

// The flat dot products run in 64-byte vectors on the AVX-512 machine (VB: vector bytes; the staged
// planes' zero slack, pad_end, covers a 16-lane tail): interleaved, two threads, input from DRAM,
// 8x128x75x75 2.36 -> 1.89 ms, 8x144x56x56 5x5 2.02 -> 1.65, 8x728x19x19 0.72 -> 0.66; 10x10 and 7x7
// planes, bound by their staging, unchanged (0.42, 0.54).
template <class T, int VB = kAvx512Machine ? 64 : 32>
void bwd_weight_nchw(const T* gy, const T* x, T* gw, T* gb, const DwGeom& g) {
#if defined(__AVX512F__)
  if (blocked_weight_planes<T>(g, omp_get_max_threads())) return bwd_weight_blocked(gy, x, gw, gb, g);  // (depthwise_blocked.h)
  // (one thread per channel there: enough channels to share; 3x3 interleaved from DRAM, two threads:
  // 8x1024x10x10 0.48 -> 0.31 ms, 8x480x14x14 0.34 -> 0.23, 32x1024x10x10 1.91 -> 1.41; 5x5 within 4 %)
  if (masked_planes(g) && g.Cm >= 4 * omp_get_max_threads()) return bwd_weight_masked(gy, x, gw, gb, g);
#endif
  const int64_t K = g.kH * g.kW;
  ThreadPartials<double> part(g.Cm * (K + 1));  // [o*K + tap], then [Cm*K + o] for the bias
  if (g.N * g.Ho * g.Wo == 0) {
    std::fill(gw, gw + g.Cm * K, T(0));
    if (gb) std::fill(gb, gb + g.Cm, T(0));
    return;
  }
  const int64_t Wp = DwStage(g, 1).Wp;
  // Rows per block: at most kMaxTerms vectors of products per lane and tap.
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(g.Ho, WeightAcc<T, VB>::kMaxTerms * L / Wp - 1));
#pragma omp parallel if (dw_parallel(g))
  {
    DwScratch<T> xs;
    std::vector<T> G(static_cast<size_t>((rb + 1) * Wp + L), T(0));
    WeightAcc<T, VB> wa(K, g.Cm, gb != nullptr);
    double* acc = part.mine();
    // Planes by blocks of B channels, image by image: a thread's consecutive planes share one
    // block's accumulators and are B consecutive planes of one image (whole pages, prefetchable).
    constexpr int64_t B = WeightAcc<T, VB>::B;
    const int64_t tasks = ceil_div(g.Cm, B) * g.N * B;
    auto plane = [&](int64_t t, int64_t& o) {  // task t's (n, o): -1 past the end or the channels
      const int64_t ob = t / (g.N * B), r = t - ob * (g.N * B), n = r / B;
      o = ob * B + r % B;
      return t < tasks && o < g.Cm ? n : -1;
    };
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      int64_t o, o1;
      const int64_t n = plane(t, o);
      if (n < 0) continue;
      const T* gyp = gy + (n * g.Cm + o) * g.Ho * g.Wo;
      const T* xp = x + (n * g.C + o / g.m) * g.H * g.W;
      // At stride > 1, the next task's planes prefetched a share per flat-dot pass: the staging of
      // x (phase split) waited on DRAM (a third of the pass's samples in dw_stage). Zen5, two threads,
      // interleaved, from DRAM: 8x96x112x112 s2 3.11-3.17 -> 2.02 ms (eager 2.84-3.34), 8x256x38x38
      // 0.66-0.71 -> 0.54 (eager 0.66), 5x5 8x96x112x112 3.21 -> 2.75. At stride 1 it cost: 8x128x75x75
      // 1.97-2.07 -> 2.31-2.50, 5x5 8x144x56x56 1.82 -> 1.98 (into L2 only: 2.55, 2.01; slower at
      // stride 2 too). On AMD family 19h they go into L2 (prefetch_into_l2), and there they pay at stride
      // 1 too (Zen4, same setting, two runs: 8x144x56x56 1.97 -> 1.75 and 2.53 -> 2.10 ms, 5x5 2.96 ->
      // 2.37 and 3.11 -> 2.53, 7x7 8x96x56x56 3.54 -> 3.09, 8x128x75x75 3.12 -> 3.17 and 3.88 -> 3.65;
      // the Zen3 is unmeasured).
      LinePrefetch next_x, next_gy;
      const int64_t n1 = g.sH > 1 || g.sW > 1 || amd_family_19h() ? plane(t + 1, o1) : -1;
      if (n1 >= 0) {
        const T* x1 = x + (n1 * g.C + o1 / g.m) * g.H * g.W;
        const T* gy1 = gy + (n1 * g.Cm + o1) * g.Ho * g.Wo;
        next_x = LinePrefetch(x1, x1 + g.H * g.W), next_gy = LinePrefetch(gy1, gy1 + g.Ho * g.Wo);
      }
      bwd_weight_plane_staged(gyp, xp, o, acc, gb != nullptr, rb, g, xs, G, wa, next_x, next_gy);
    }
    wa.flush(acc);
  }
  for (int64_t k = 0; k < g.Cm * K; ++k) gw[k] = static_cast<T>(part.sum(k));
  if (gb)
    for (int64_t o = 0; o < g.Cm; ++o) gb[o] = static_cast<T>(part.sum(g.Cm * K + o));
}


// Channels_last weight/bias gradient of output row i (image xn, grad_y row gyr), channels [o0, o1),
// output pixels [j0, j1) (the whole row by default), any geometry and multiplier, exact: only the
// taps inside the image. Adds into row[t*ws + o] (tap t) and, with `bias`, row[K*ws + o].
template <class T>
void wgrad_row_cl_exact(const T* gyr, const T* xn, int64_t i, T* row, int64_t o0, int64_t o1, bool bias,
                        const DwGeom& g, int64_t j0 = 0, int64_t j1 = -1) {
  const int64_t K = g.kH * g.kW;
  const TapRange pr = tap_range(i, g.sH, g.pT, g.dH, g.kH, g.H);
  for (int64_t j = j0; j < (j1 < 0 ? g.Wo : j1); ++j) {
    const TapRange qr = tap_range(j, g.sW, g.pL, g.dW, g.kW, g.W);
    const T* gys = gyr + j * g.Cm;
    for (int64_t p = pr.lo; p < pr.hi; ++p)
      for (int64_t q = qr.lo; q < qr.hi; ++q) {
        const T* px = xn + ((i * g.sH - g.pT + p * g.dH) * g.W + j * g.sW - g.pL + q * g.dW) * g.C;
        T* ra = row + (p * g.kW + q) * g.ws;
        if (g.m == 1) {
#pragma omp simd
          for (int64_t o = o0; o < o1; ++o) ra[o] += gys[o] * px[o];
        } else {
          for (int64_t o = o0; o < o1; ++o) ra[o] += gys[o] * px[o / g.m];
        }
      }
    if (bias) {
      T* rb = row + K * g.ws;
#pragma omp simd
      for (int64_t o = o0; o < o1; ++o) rb[o] += gys[o];
    }
  }
}

// Tap sums of one channel vector c over output pixels [j0, j1) of a row, from staged rows (see
// wgrad_row_cl_staged), added into row; returns the sum of s - s over the sums (NaN unless all
// finite). KH 3: the whole 3 x KW window at once (one grad_y load per 3*KW FMAs, 3*KW chains);
// KH 0: window row by window row, two pixel phases for 2*KW independent chains.
template <class T, int KH, int KW, int B = 32>
inline bool wgrad_run(const T* const* rows, int64_t ps, const T* gyr, T* row, int64_t c, int64_t j0, int64_t j1,
                      bool bias, const DwGeom& g, typename Vec<T, B>::type* sums) {
  using V = typename Vec<T, B>::type;
  const int64_t K = g.kH * KW, sp = g.sW * ps;  // staged distance between consecutive pixels' windows
  auto flush = [&](int64_t p, const V* s) {
#pragma GCC unroll 8
    for (int q = 0; q < KW; ++q) sums[p * KW + q] = s[q];
  };
  V accb{};
  if constexpr (KH == 3) {
    V acc[3][KW] = {};
    const T* gs = gyr + j0 * g.Cm + c;
    const T *x0 = rows[0] + j0 * sp + c, *x1 = rows[1] + j0 * sp + c, *x2 = rows[2] + j0 * sp + c;
    for (int64_t j = j0; j < j1; ++j, gs += g.Cm, x0 += sp, x1 += sp, x2 += sp) {
      const V gv = vload<T, B>(gs);
      accb += gv;
#pragma GCC unroll 8
      for (int q = 0; q < KW; ++q) {
        acc[0][q] += gv * vload<T, B>(x0 + q * ps);
        acc[1][q] += gv * vload<T, B>(x1 + q * ps);
        acc[2][q] += gv * vload<T, B>(x2 + q * ps);
      }
    }
    for (int p = 0; p < 3; ++p) flush(p, acc[p]);
  } else {
    for (int64_t p = 0; p < g.kH; ++p) {
      V acc[2][KW] = {};
      const T* gs = gyr + j0 * g.Cm + c;
      const T* xs = rows[p] + j0 * sp + c;
      int64_t j = j0;
      for (; j + 2 <= j1; j += 2, xs += 2 * sp, gs += 2 * g.Cm)
#pragma GCC unroll 2
        for (int e = 0; e < 2; ++e) {
          const V gv = vload<T, B>(gs + e * g.Cm);
          if (p == 0) accb += gv;
#pragma GCC unroll 8
          for (int q = 0; q < KW; ++q) acc[e][q] += gv * vload<T, B>(xs + e * sp + q * ps);
        }
      if (j < j1) {
        const V gv = vload<T, B>(gs);
        if (p == 0) accb += gv;
#pragma GCC unroll 8
        for (int q = 0; q < KW; ++q) acc[0][q] += gv * vload<T, B>(xs + q * ps);
      }
#pragma GCC unroll 8
      for (int q = 0; q < KW; ++q) acc[0][q] += acc[1][q];
      flush(p, acc[0]);
    }
  }
  // Added to row only when every sum is finite (s - s is 0 for finite s, NaN otherwise), so that
  // a run the caller redoes exactly leaves row as it was.
  V chk = accb - accb;
  for (int64_t t = 0; t < K; ++t) chk += sums[t] - sums[t];
  for (int l = 0; l < Vec<T, B>::lanes; ++l)
    if (!(chk[l] == 0)) return false;
  for (int64_t t = 0; t < K; ++t) {
    T* ra = row + t * g.ws + c;
    vstore(ra, vload<T, B>(ra) + sums[t]);
  }
  if (bias) {
    T* rb = row + K * g.ws + c;
    vstore(rb, vload<T, B>(rb) + accb);
  }
  return true;
}

// The same for multiplier 1 from rows of pixels (ClRowSource: staged, zero-padded rows, or x's own
// for the pixels whose windows lie inside it; window row p at rows[p], pixels ps apart), KW column
// taps at dilation 1: per channel vector the tap sums stay in registers over a run of 32 pixels
// (the run's input lines stay in L1 for the next channel vector, which reads their other half),
// where the exact kernel above loads and stores its accumulator row around every FMA. Padding taps
// multiply staged zeros (or the zero row), which differs from
// skipping them only when grad_y holds Inf/NaN (0 * Inf): a channel vector whose sums come out
// non-finite is redone exactly.
// sums: kH * KW vectors of scratch. gy_next: the next row's grad_y, stepped a share per vector.
template <class T, int KW>
void wgrad_row_cl_staged(const T* const* rows, int64_t ps, const T* gyr, const T* xn, int64_t i, T* row, bool bias,
                         const DwGeom& g, typename Vec<T>::type* sums, typename Vec<T, 64>::type* sums64,
                         LinePrefetch& gy_next) {
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t JC = 32;
  const int64_t cv = g.Cm / L * L;  // channels in whole vectors
  // AVX-512 builds: 64-byte vectors where each pixel's channels are whole cache lines (at 728
  // channels every other pixel's loads would split a line: 0.78 -> 0.92 ms). Zen5, two threads,
  // interleaved: 8x96x112x112 s2 1.47 -> 1.37 ms, 8x256x38x38 s2 0.56 -> 0.45, 8x144x56x56 5x5 s2
  // 0.77 -> 0.63, 8x128x75x75 2.49 -> 2.39, 8x144x56x56 1.64 -> 1.50.
  const int64_t cw = wide_pixels<T>(g.Cm) ? g.Cm : 0;
  for (int64_t j0 = 0; j0 < g.Wo; j0 += JC) {
    const int64_t j1 = std::min(g.Wo, j0 + JC);
    // The next row's fresh input row prefetched run by run, as the forward does (NextRowPrefetch),
    // at row stride 1 only. Zen5, two threads, interleaved, two runs: stride 1 8x128x75x75 2.81 ->
    // 2.59 ms, 8x144x56x56 1.78 -> 1.65, 8x728x19x19 0.96 -> 0.90; stride 2 mixed (8x96x112x112
    // 1.63 -> 1.73, 8x256x38x38 0.63 -> 0.51, 5x5 unchanged). Not measured on the Zen3.
    NextRowPrefetch<T> pf;
    if (g.sH == 1) pf = NextRowPrefetch<T>(xn, i, j0, j1 < g.Wo ? j1 : g.Wo + g.kW * g.dW, g);
    const int64_t per = pf.share(cv / L);  // lines per 32-byte vector
    const int64_t gper = gy_next.share(ceil_div(g.Wo - j0, JC) * (cv / L));
    // channels [c0, c_end) in vectors of `width` bytes, their tap sums in s; returns where it stopped
    auto vectors = [&](auto width, int64_t c0, int64_t c_end, typename Vec<T, decltype(width)::value>::type* s) {
      constexpr int B = decltype(width)::value, LB = Vec<T, B>::lanes;
      int64_t c = c0;
      for (; c < c_end; c += LB) {
        pf.step(per * (LB / L));
        gy_next.step(gper * (LB / L));
        const bool ok = g.kH == 3 ? wgrad_run<T, 3, KW, B>(rows, ps, gyr, row, c, j0, j1, bias, g, s)
                                  : wgrad_run<T, 0, KW, B>(rows, ps, gyr, row, c, j0, j1, bias, g, s);
        if (!ok) wgrad_row_cl_exact(gyr, xn, i, row, c, c + LB, bias, g, j0, j1);
      }
      return c;
    };
    vectors(std::integral_constant<int, 32>{}, vectors(std::integral_constant<int, 64>{}, 0, cw, sums64), cv, sums);
  }
  if (cv < g.Cm) wgrad_row_cl_exact(gyr, xn, i, row, cv, g.Cm, bias, g);
}

template <class T>
void bwd_weight_cl(const T* gy, const T* x, T* gw, T* gb, const DwGeom& g0) {
  // Rows of tap sums [tap*ws + o], then [K*ws + o] for the bias: ws pads them apart where Cm would
  // put a channel vector's K + 1 sums in one L1 set (cl_padded).
  const DwGeom g = cl_padded<T>(g0);
  const int64_t K = g.kH * g.kW, width = (K + 1) * g.ws;
  // The staged kernel wherever a channel vector is whole (3x3 below that: the exact kernel alone).
  // Until 2026-11-26 3x3 took it only past 8 KiB of accumulators (K x Cm), from a single-thread
  // measurement of an older staged kernel; two threads, N = 8, the staged kernel now measured 5.3x
  // the exact one at 32 channels 44x44, 5.0x at 8 channels, 1.8x at 144 channels 56x56, 1.4x at
  // 128 channels 75x75, 1.2x at 12-20 channels, equal at 728-1024 (float64: 2.0x at 32 channels).
  const bool staged = g.m == 1 && g.dW == 1 && (g.kW == 5 || (g.kW == 3 && g.Cm >= Vec<T>::lanes));
  ThreadPartials<double> part(width);
#pragma omp parallel if (dw_parallel(g))
  {
    // A thread's contiguous run of output rows (consecutive rows share staged input rows).
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num(), rows = g.N * g.Ho;
    const int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;
    // Flushed into the doubles every kFlushPixels output pixels, not every row: on 10-wide rows the
    // (K + 1) x Cm flush cost a fifth of the pass. A float sum spans at most max(Wo, kFlushPixels)
    // pixels, as a row of a wide image always did.
    constexpr int64_t kFlushPixels = 128;
    int64_t pixels = 0;
    std::vector<T> row(static_cast<size_t>(width), T(0));
    std::vector<typename Vec<T>::type> sums(static_cast<size_t>(staged ? K : 0));
    std::vector<typename Vec<T, 64>::type> sums64(static_cast<size_t>(staged ? K : 0));
    // x read in place (ClRowSource) for 3x3 windows at stride 2 only: the edge pixels' exact sums
    // (wgrad_row_cl_exact) cost about what staging saved elsewhere. Zen5, two threads, interleaved,
    // copy 40-43 GB/s, ring -> x: stride 2 8x256x38x38 0.69 -> 0.52 ms, 8x96x112x112 1.65 -> 1.55;
    // 5x5 stride 2 8x96x112x112 1.9-2.0 -> 2.1-2.2, 8x144x56x56 0.76 -> 0.86; stride 1 8x728x19x19
    // 0.99 -> 1.04-1.05, 8x128x75x75 2.43 -> 2.35, 8x144x56x56 1.56 -> 1.55.
    std::unique_ptr<ClRowSource<T>> src(staged ? new ClRowSource<T>(g, g.kW == 3 && g.sW == 2) : nullptr);
    const auto run = g.kW == 3 ? wgrad_row_cl_staged<T, 3> : wgrad_row_cl_staged<T, 5>;
    double* acc = part.mine();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, i = r % g.Ho;
      const T* xn = x + n * g.H * g.W * g.C;
      const T* gyr = gy + r * g.Wo * g.Cm;
      // The next row's grad_y, prefetched a share per channel vector: the runs read a grad_y row one
      // channel vector at a time, a line per pixel Cm apart, which the hardware prefetchers did not
      // follow (71 % of the pass's samples sat on the grad_y load). Zen5, two threads, interleaved,
      // from DRAM: 8x128x75x75 2.48-2.51 -> 1.36-1.48 ms (eager 2.0-2.36), 8x728x19x19 0.94 -> 0.48-0.51
      // (eager 0.78-0.81), 8x144x56x56 1.57 -> 0.94, 5x5 1.81 -> 1.32, 8x1024x10x10 0.37 -> 0.20, stride 2
      // 8x96x112x112 1.29 -> 1.21, 5x5 1.59-1.79 -> 1.32-1.40, but 8x256x38x38 0.45-0.50 -> 0.47-0.53;
      // into L2 only, slower at stride 1 (75x75 1.76 ms). On AMD family 19h into L2 (prefetch_into_l2;
      // with every pass's prefetches there the Zen4's 8x128x75x75 forward+backward took 8.29 -> 6.10 ms).
      LinePrefetch gy_next;
      if (r + 1 < r1) gy_next = LinePrefetch(gyr + g.Wo * g.Cm, gyr + 2 * g.Wo * g.Cm);
      if (staged) {
        src->row(
            xn, n, i,
            [&](const T* const* rows, int64_t ps, const DwGeom& piece, int64_t j0) {
              run(rows, ps, gyr + j0 * g.Cm, xn, i, row.data(), gb != nullptr, piece, sums.data(), sums64.data(),
                  gy_next);
            },
            [&](int64_t j0, int64_t j1) { wgrad_row_cl_exact(gyr, xn, i, row.data(), 0, g.Cm, gb != nullptr, g, j0, j1); });
      } else {
        wgrad_row_cl_exact(gyr, xn, i, row.data(), 0, g.Cm, gb != nullptr, g);
      }
      pixels += g.Wo;
      if (pixels >= kFlushPixels || r + 1 == r1) {
        for (int64_t k = 0; k < width; ++k) {
          acc[k] += row[k];
          row[k] = 0;
        }
        pixels = 0;
      }
    }
  }
  for (int64_t o = 0; o < g.Cm; ++o)
    for (int64_t t = 0; t < K; ++t) gw[o * K + t] = static_cast<T>(part.sum(t * g.ws + o));
  if (gb)
    for (int64_t o = 0; o < g.Cm; ++o) gb[o] = static_cast<T>(part.sum(K * g.ws + o));
}

// ---------------------------------------------------------------------------------------------
// Python entry points: shapes come from the arrays, layouts are checked before any access
// ---------------------------------------------------------------------------------------------
using Strides = std::vector<int64_t>;

void py_fwd(const Buf& x, const Buf& w, const py::object& bias, const Buf& y, int64_t sH, int64_t sW,
            int64_t pT, int64_t pL, int64_t dH, int64_t dW, bool cl) {
  require(x.ndim() == 4 && w.ndim() == 4 && y.ndim() == 4, "depthwise_fwd: 4-D x, weight and y expected");
  const DwGeom g = make_geom(x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0), w.shape(2), w.shape(3),
                             y.shape(2), y.shape(3), sH, sW, pT, pL, dH, dW);
  dispatch_float(x, "depthwise_fwd", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(x, "x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, cl), false);
    check_dense<T>(w, "weight", {g.Cm, 1, g.kH, g.kW}, {g.kH * g.kW, g.kH * g.kW, g.kW, 1}, false);
    check_dense<T>(y, "y", {g.N, g.Cm, g.Ho, g.Wo}, strides4(g.Cm, g.Ho, g.Wo, cl), true);
    const T* b = nullptr;
    if (!bias.is_none()) {
      Buf ba = bias.cast<Buf>();
      check_dense<T>(ba, "bias", {g.Cm}, {1}, false);
      b = cptr<T>(ba);
    }
    py::gil_scoped_release nogil;
    fwd(cptr<T>(x), cptr<T>(w), b, mptr<T>(y), g, cl);
  });
}

void py_bwd_input(const Buf& gy, const Buf& w, const Buf& gx, int64_t sH, int64_t sW, int64_t pT,
                  int64_t pL, int64_t dH, int64_t dW, bool cl) {
  require(gy.ndim() == 4 && w.ndim() == 4 && gx.ndim() == 4, "depthwise_bwd_input: 4-D arrays expected");
  const DwGeom g = make_geom(gx.shape(0), gx.shape(1), gx.shape(2), gx.shape(3), w.shape(0), w.shape(2),
                             w.shape(3), gy.shape(2), gy.shape(3), sH, sW, pT, pL, dH, dW);
  dispatch_float(gy, "depthwise_bwd_input", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(gy, "grad_y", {g.N, g.Cm, g.Ho, g.Wo}, strides4(g.Cm, g.Ho, g.Wo, cl), false);
    check_dense<T>(w, "weight", {g.Cm, 1, g.kH, g.kW}, {g.kH * g.kW, g.kH * g.kW, g.kW, 1}, false);
    check_dense<T>(gx, "grad_x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, cl), true);
    py::gil_scoped_release nogil;
    if (cl)
      bwd_input_cl(cptr<T>(gy), cptr<T>(w), mptr<T>(gx), g);
    else
      bwd_input_nchw(cptr<T>(gy), cptr<T>(w), mptr<T>(gx), g);
  });
}

void py_bwd_weight(const Buf& gy, const Buf& x, const Buf& gw, const py::object& gb, int64_t sH,
                   int64_t sW, int64_t pT, int64_t pL, int64_t dH, int64_t dW, bool cl) {
  require(gy.ndim() == 4 && x.ndim() == 4 && gw.ndim() == 4, "depthwise_bwd_weight: 4-D arrays expected");
  const DwGeom g = make_geom(x.shape(0), x.shape(1), x.shape(2), x.shape(3), gw.shape(0), gw.shape(2),
                             gw.shape(3), gy.shape(2), gy.shape(3), sH, sW, pT, pL, dH, dW);
  dispatch_float(x, "depthwise_bwd_weight", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(gy, "grad_y", {g.N, g.Cm, g.Ho, g.Wo}, strides4(g.Cm, g.Ho, g.Wo, cl), false);
    check_dense<T>(x, "x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, cl), false);
    check_dense<T>(gw, "grad_weight", {g.Cm, 1, g.kH, g.kW}, {g.kH * g.kW, g.kH * g.kW, g.kW, 1}, true);
    T* b = nullptr;
    Buf ba;
    if (!gb.is_none()) {
      ba = gb.cast<Buf>();
      check_dense<T>(ba, "grad_bias", {g.Cm}, {1}, true);
      b = mptr<T>(ba);
    }
    py::gil_scoped_release nogil;
    if (cl)
      bwd_weight_cl(cptr<T>(gy), cptr<T>(x), mptr<T>(gw), b, g);
    else
      bwd_weight_nchw(cptr<T>(gy), cptr<T>(x), mptr<T>(gw), b, g);
  });
}

}  // namespace

template <class T>
void depthwise_forward(const T* x, const T* w, const T* bias, T* y, const DwGeom& g, bool cl) {
  fwd(x, w, bias, y, g, cl);
}
template void depthwise_forward<float>(const float*, const float*, const float*, float*, const DwGeom&, bool);
template void depthwise_forward<double>(const double*, const double*, const double*, double*, const DwGeom&, bool);

void init_depthwise(py::module_& m) {
  using namespace pybind11::literals;
  m.def("depthwise_fwd", &py_fwd, "x"_a, "weight"_a, "bias"_a.none(true), "y"_a, "sH"_a, "sW"_a, "pT"_a, "pL"_a,
        "dH"_a, "dW"_a, "channels_last"_a, "y = depthwise_conv2d(x, weight) + bias, written into y");
  m.def("depthwise_bwd_input", &py_bwd_input, "grad_y"_a, "weight"_a, "grad_x"_a, "sH"_a, "sW"_a, "pT"_a, "pL"_a,
        "dH"_a, "dW"_a, "channels_last"_a, "grad_x of a depthwise conv, written into grad_x");
  m.def("depthwise_bwd_weight", &py_bwd_weight, "grad_y"_a, "x"_a, "grad_weight"_a, "grad_bias"_a.none(true), "sH"_a,
        "sW"_a, "pT"_a, "pL"_a, "dH"_a, "dW"_a, "channels_last"_a,
        "grad_weight (and grad_bias unless None) of a depthwise conv, written into them");
}

}  // namespace dlk
