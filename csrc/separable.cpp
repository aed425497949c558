// Fused separable conv: depthwise k x k then pointwise 1 x 1. Each task computes the depthwise
// output of a block of output pixels for all C*m channels into a thread-local buffer sized for L2,
// then multiplies it by the pointwise weight with dlk::gemm on the calling thread, bias fused; the
// depthwise intermediate never goes to memory in full. Contract: dlkernels/separable/op.py.
#include "depthwise.h"
#include "gemm.h"

namespace dlk {
namespace {

// Pixels per block: the depthwise buffer (pixels x C*m) stays well inside L2 next to the GEMM's
// packed panels, and there are enough blocks to keep every thread busy.
int64_t block_pixels(int64_t total, int64_t Cm, size_t elem) {
  constexpr int64_t BUF_BYTES = 128 * 1024;
  int64_t px = std::max<int64_t>(1, BUF_BYTES / (Cm * static_cast<int64_t>(elem)));
  const int64_t min_blocks = 4 * omp_get_max_threads();
  if (ceil_div(total, px) < min_blocks) px = std::max<int64_t>(1, ceil_div(total, min_blocks));
  return px;
}

template <class T>
void fwd_nchw(const T* x, const T* dw, const T* pw, const T* bias, T* y, int64_t O, const DwGeom& g) {
  const int64_t K = g.kH * g.kW, HWo = g.Ho * g.Wo;
  const int64_t rows = std::max<int64_t>(1, block_pixels(g.N * HWo, g.Cm, sizeof(T)) / std::max<int64_t>(g.Wo, 1));
  const int64_t nb = ceil_div(g.Ho, rows);
#pragma omp parallel
  {
    std::vector<T> buf(static_cast<size_t>(g.Cm * std::min(rows, g.Ho) * g.Wo)), pad;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < g.N * nb; ++t) {
      const int64_t n = t / nb, i0 = (t % nb) * rows, i1 = std::min(g.Ho, i0 + rows), P = (i1 - i0) * g.Wo;
      for (int64_t o = 0; o < g.Cm; ++o) {
        const T* xp = x + (n * g.C + o / g.m) * g.H * g.W;
        dw_rows_padded(xp, dw + o * K, T(0), buf.data() + o * P, i0, i1, g, pad);
      }
      // y[n, :, i0:i1, :] (O x P, row stride Ho*Wo) = pw (O x Cm) @ buf (Cm x P)
      gemm<T>(O, P, g.Cm, pw, g.Cm, 1, buf.data(), P, 1, y + n * O * HWo + i0 * g.Wo, HWo, bias, 0, false, false);
    }
  }
}

template <class T>
void fwd_cl(const T* x, const T* dw, const T* pw, const T* bias, T* y, int64_t O, const DwGeom& g) {
  const int64_t HWo = g.Ho * g.Wo, total = g.N * HWo;
  const int64_t px = block_pixels(total, g.Cm, sizeof(T)), nb = ceil_div(total, px);
  const std::vector<T> wt = taps_major(dw, g.Cm, g.kH * g.kW);
#pragma omp parallel
  {
    std::vector<T> buf(static_cast<size_t>(g.Cm * std::min(px, total)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nb; ++t) {
      const int64_t q0 = t * px, q1 = std::min(total, q0 + px);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / HWo, i = (q % HWo) / g.Wo, j = q % g.Wo;
        dw_pixel_cl(x + n * g.H * g.W * g.C, wt.data(), (const T*)nullptr, buf.data() + (q - q0) * g.Cm, i, j, g);
      }
      // y pixels q0..q1 (P x O) = buf (P x Cm) @ pw^T (Cm x O)
      gemm<T>(q1 - q0, O, g.Cm, buf.data(), g.Cm, 1, pw, 1, g.Cm, y + q0 * O, O, bias, 1, false, false);
    }
  }
}

void py_fwd(const py::array& x, const py::array& dw, const py::array& pw, const py::object& bias, py::array& y,
            int64_t sH, int64_t sW, int64_t pT, int64_t pL, int64_t dH, int64_t dW, bool cl) {
  require(x.ndim() == 4 && dw.ndim() == 4 && pw.ndim() == 2 && y.ndim() == 4,
          "separable_fwd: 4-D x, dw_weight, y and 2-D pw_weight expected");
  const DwGeom g = make_geom(x.shape(0), x.shape(1), x.shape(2), x.shape(3), dw.shape(0), dw.shape(2), dw.shape(3),
                             y.shape(2), y.shape(3), sH, sW, pT, pL, dH, dW);
  const int64_t O = pw.shape(0);
  dispatch_float(x, "separable_fwd", [&](auto tag) {
    using T = decltype(tag);
    check_dense<T>(x, "x", {g.N, g.C, g.H, g.W}, strides4(g.C, g.H, g.W, cl), false);
    check_dense<T>(dw, "dw_weight", {g.Cm, 1, g.kH, g.kW}, {g.kH * g.kW, g.kH * g.kW, g.kW, 1}, false);
    check_dense<T>(pw, "pw_weight", {O, g.Cm}, {g.Cm, 1}, false);
    check_dense<T>(y, "y", {g.N, O, g.Ho, g.Wo}, strides4(O, g.Ho, g.Wo, cl), true);
    const T* b = nullptr;
    if (!bias.is_none()) {
      py::array ba = bias.cast<py::array>();
      check_dense<T>(ba, "bias", {O}, {1}, false);
      b = cptr<T>(ba);
    }
    py::gil_scoped_release nogil;
    if (g.N * g.Ho * g.Wo == 0 || O == 0) return;
    if (cl)
      fwd_cl(cptr<T>(x), cptr<T>(dw), cptr<T>(pw), b, mptr<T>(y), O, g);
    else
      fwd_nchw(cptr<T>(x), cptr<T>(dw), cptr<T>(pw), b, mptr<T>(y), O, g);
  });
}

}  // namespace

void init_separable(py::module_& m) {
  using namespace pybind11::literals;
  m.def("separable_fwd", &py_fwd, "x"_a, "dw_weight"_a, "pw_weight"_a, "bias"_a.none(true), "y"_a, "sH"_a, "sW"_a,
        "pT"_a, "pL"_a, "dH"_a, "dW"_a, "channels_last"_a,
        "y = pointwise(depthwise(x)) + bias, fused: the depthwise output stays in per-thread cache-sized blocks");
}

}  // namespace dlk
