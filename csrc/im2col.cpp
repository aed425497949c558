// im2col of a channels_last input and its adjoint, for dlkernels.nn.Conv2d (dense k x k convs as a
// GEMM over window rows; dlkernels/im2col/op.py).
//
// rows: (N*Ho*Wo, K) with K = kH*kW*C, row (n, i, j) holding the window of output pixel (i, j) of
// image n, in (kH, kW, C) order (taps_first: a channels_last weight's order, each tap a run of C
// contiguous values) or (C, kH, kW) (an NCHW weight's order); taps in the padding are 0.
//
// The forward writes each row once, padding included, where torch pads the input into a copy and
// then copies a strided view of it. The backward gathers: each input pixel sums, over the taps that
// read it, its values in those rows, and is written once; no zero fill, no scatter, no atomics.
#include "conv_common.h"

#include <cstring>
#include <vector>

namespace dlk {
namespace {

struct Im2colGeom {
  int64_t N, H, W, C, kH, kW, sH, sW, pH, pW, dH, dW, Ho, Wo;
  int64_t K() const { return kH * kW * C; }
};

// Bytes [0, N) from s to d through one register (conv_common.h's vector load and store).
template <int N>
DLK_INLINE void move_bytes(char* d, const char* s) { vstore(d, vload<char, N>(s)); }

// n values from src to dst (not overlapping). Short runs (a stem conv's C of 1-3 makes runs of a few
// values) as two fixed-size moves that overlap in the middle, the small-size trick of memcpy itself
// without its call: a plain element loop was compiled to one scalar move an element, and a memcpy
// call costs more than the copy (two threads, interleaved with the loop: 8x1x48x48 5x5 217 -> 186 us,
// 8x3x64x64 7x7 s2 203 -> 153, 8x8x32x32 3x3 89 -> 73; C >= 64 unchanged). Every byte read
// and written lies in [0, n) values of src and dst.
template <class T>
DLK_INLINE void copy_run(T* dst, const T* src, int64_t n) {
  const int64_t bytes = n * int64_t(sizeof(T));
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  if (bytes >= 256) {
    std::memcpy(d, s, bytes);
  } else if (bytes > 32) {
    for (int64_t i = 0; i < bytes - 32; i += 32) move_bytes<32>(d + i, s + i);
    move_bytes<32>(d + bytes - 32, s + bytes - 32);
  } else if (bytes >= 16) {
    move_bytes<16>(d, s);
    move_bytes<16>(d + bytes - 16, s + bytes - 16);
  } else if (bytes >= 8) {
    move_bytes<8>(d, s);
    move_bytes<8>(d + bytes - 8, s + bytes - 8);
  } else if (bytes >= 4) {
    move_bytes<4>(d, s);
    move_bytes<4>(d + bytes - 4, s + bytes - 4);
  }
}

template <class T>
void im2col(const T* x, T* rows, const Im2colGeom& g, bool taps_first) {
  const int64_t K = g.K(), taps = g.kH * g.kW;
  taps_first = taps_first || g.C == 1;  // one channel: both orders are the same
#pragma omp parallel for schedule(static) if (worth_threads(g.N * g.Ho * g.Wo * K))
  for (int64_t ni = 0; ni < g.N * g.Ho; ++ni) {
    const int64_t n = ni / g.Ho, i = ni - n * g.Ho;
    for (int64_t j = 0; j < g.Wo; ++j) {
      T* row = rows + (ni * g.Wo + j) * K;
      // the taps [b0, b1) of a kernel row that land inside the input's columns
      const int64_t w0 = j * g.sW - g.pW;
      const TapRange cols = tap_range(j, g.sW, g.pW, g.dW, g.kW, g.W);
      const int64_t b0 = cols.lo, b1 = cols.hi;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        const int64_t h = i * g.sH - g.pH + kh * g.dH;
        const bool row_inside = h >= 0 && h < g.H;
        // tap kw of an inside row reads x + base + kw*dW*C (only formed for inside taps)
        const int64_t base = ((n * g.H + h) * g.W + w0) * g.C;
        if (taps_first) {
          T* dst = row + kh * g.kW * g.C;
          if (!row_inside) {
            for (int64_t e = 0; e < g.kW * g.C; ++e) dst[e] = T(0);
            continue;
          }
          for (int64_t e = 0; e < b0 * g.C; ++e) dst[e] = T(0);
          if (g.dW == 1) {  // the inside taps are one run of the input row: one copy, not one per tap
            copy_run(dst + b0 * g.C, x + base + b0 * g.C, (b1 - b0) * g.C);
          } else {
            for (int64_t kw = b0; kw < b1; ++kw) copy_run(dst + kw * g.C, x + base + kw * g.dW * g.C, g.C);
          }
          for (int64_t e = b1 * g.C; e < g.kW * g.C; ++e) dst[e] = T(0);
        } else {
          for (int64_t kw = 0; kw < g.kW; ++kw) {
            const int64_t tap = kh * g.kW + kw;
            const bool inside = row_inside && kw >= b0 && kw < b1;
            for (int64_t c = 0; c < g.C; ++c) row[c * taps + tap] = inside ? x[base + kw * g.dW * g.C + c] : T(0);
          }
        }
      }
    }
  }
}

// The (tap, output position) pairs that read each input position of one dimension (taps_reading),
// tabled once a call so that the gather's loops divide nothing.
inline std::vector<std::vector<TapOut>> tap_table(int64_t size, int64_t out_size, int64_t k, int64_t stride,
                                                  int64_t pad, int64_t dil) {
  std::vector<std::vector<TapOut>> table(size);
  for (int64_t p = 0; p < size; ++p) taps_reading(p, stride, pad, dil, k, out_size, table[p]);
  return table;
}

template <class T>
void col2im(const T* rows, T* gx, const Im2colGeom& g, bool taps_first) {
  const int64_t K = g.K(), taps = g.kH * g.kW;
  const auto th = tap_table(g.H, g.Ho, g.kH, g.sH, g.pH, g.dH), tw = tap_table(g.W, g.Wo, g.kW, g.sW, g.pW, g.dW);
#pragma omp parallel for schedule(static) if (worth_threads(g.N * g.Ho * g.Wo * K))
  for (int64_t nh = 0; nh < g.N * g.H; ++nh) {
    const int64_t n = nh / g.H, h = nh % g.H;
    for (int64_t w = 0; w < g.W; ++w) {
      T* dst = gx + (nh * g.W + w) * g.C;
      std::fill(dst, dst + g.C, T(0));
      for (const TapOut& ph : th[h]) {
        for (const TapOut& pw : tw[w]) {
          const T* row = rows + ((n * g.Ho + ph.out) * g.Wo + pw.out) * K;
          const int64_t tap = ph.tap * g.kW + pw.tap;
          if (taps_first) {
            const T* src = row + tap * g.C;
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) dst[c] += src[c];
          } else {
            for (int64_t c = 0; c < g.C; ++c) dst[c] += row[c * taps + tap];
          }
        }
      }
    }
  }
}

// x (N, C, H, W) channels_last-contiguous; rows (N*Ho*Wo, K) contiguous. Every size comes from the
// arrays and the geometry, and every array is checked against it before any access.
Im2colGeom geom_of(const Buf& x, const Buf& rows, int64_t kH, int64_t kW, int64_t sH, int64_t sW,
                   int64_t pH, int64_t pW, int64_t dH, int64_t dW, const char* op) {
  require(x.ndim() == 4 && rows.ndim() == 2, op, ": 4-D input and 2-D rows expected");
  require(kH >= 1 && kW >= 1 && sH >= 1 && sW >= 1 && dH >= 1 && dW >= 1 && pH >= 0 && pW >= 0,
          op, ": kernel, stride and dilation must be positive, padding not negative");
  Im2colGeom g{x.shape(0), x.shape(2), x.shape(3), x.shape(1), kH, kW, sH, sW, pH, pW, dH, dW, 0, 0};
  g.Ho = floor_div(g.H + 2 * pH - dH * (kH - 1) - 1, sH) + 1;
  g.Wo = floor_div(g.W + 2 * pW - dW * (kW - 1) - 1, sW) + 1;
  require(g.Ho >= 1 && g.Wo >= 1, op, ": the window is larger than the padded input");
  return g;
}

void py_im2col(const Buf& x, const Buf& rows, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH,
               int64_t pW, int64_t dH, int64_t dW, bool taps_first) {
  const Im2colGeom g = geom_of(x, rows, kH, kW, sH, sW, pH, pW, dH, dW, "im2col");
  dispatch_float(x, "im2col", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(x, "x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, true), false);
    check_dense<T>(rows, "rows", {g.N * g.Ho * g.Wo, g.K()}, {g.K(), 1}, true);
    py::gil_scoped_release nogil;
    im2col(cptr<T>(x), mptr<T>(rows), g, taps_first);
  });
}

void py_col2im(const Buf& rows, const Buf& gx, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH,
               int64_t pW, int64_t dH, int64_t dW, bool taps_first) {
  const Im2colGeom g = geom_of(gx, rows, kH, kW, sH, sW, pH, pW, dH, dW, "col2im");
  dispatch_float(gx, "col2im", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(rows, "rows", {g.N * g.Ho * g.Wo, g.K()}, {g.K(), 1}, false);
    check_dense<T>(gx, "grad_x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, true), true);
    py::gil_scoped_release nogil;
    col2im(cptr<T>(rows), mptr<T>(gx), g, taps_first);
  });
}

}  // namespace

void init_im2col(py::module_& m) {
  using namespace pybind11::literals;
  m.def("im2col", &py_im2col, "x"_a, "rows"_a, "kH"_a, "kW"_a, "sH"_a, "sW"_a, "pH"_a, "pW"_a, "dH"_a, "dW"_a,
        "taps_first"_a, "the window rows of channels_last x, (kH, kW, C) or (C, kH, kW) order, into rows");
  m.def("col2im", &py_col2im, "rows"_a, "grad_x"_a, "kH"_a, "kW"_a, "sH"_a, "sW"_a, "pH"_a, "pW"_a, "dH"_a,
        "dW"_a, "taps_first"_a, "grad_x = the adjoint of im2col applied to rows (each pixel written once)");
}

}  // namespace dlk
