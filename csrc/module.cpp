// The extension dlkernels._C: one init function per op family, each in its own file.
#include "common.h"
#include "simd.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace dlk {
namespace {

// Vectors of the widest width the build targets and their multiply-add (simd.h): one fused
// instruction; without vectors, the scalar a * m + c is a multiply and an add, two FLOPs all the same.
#ifdef DLK_SIMD_VEC
template <class S>
using Peak = simd::Vec<S>;
#else
template <class S>
struct Peak {
  using V = S;
  static constexpr int W = 1;
  static V set1(S v) { return v; }
  static V fma(V a, V m, V c) { return a * m + c; }
};
#endif

// Independent multiply-add chains a thread runs: enough to cover an FMA's latency times the issue
// width of the CPUs met so far (4 cycles x 2 pipes), few enough to stay in the 16 registers of an
// AVX2 build beside the two constants.
constexpr int kPeakChains = 12;

// FLOP/s of kPeakChains chains held in registers (no memory traffic), `steps` multiply-adds each, on
// every OpenMP thread at once. The seed is unknown at compile time and the result is kept, so that the
// compiler can neither fold the chains into one nor drop them.
template <class S>
double peak_flops(int64_t steps, S seed) {
  using P = Peak<S>;
  int threads = 1;
  S sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : sink)
  {
#pragma omp single
    threads = omp_get_num_threads();
    typename P::V a[kPeakChains];
    for (int k = 0; k < kPeakChains; ++k) a[k] = P::set1(seed + S(k));
    const typename P::V m = P::set1(S(0.999999)), c = P::set1(S(1e-7));
    for (int64_t i = 0; i < steps; ++i)
      for (int k = 0; k < kPeakChains; ++k) a[k] = P::fma(a[k], m, c);
    for (int k = 1; k < kPeakChains; ++k) a[0] = P::fma(a[k], m, a[0]);
    S lanes[P::W];
    std::memcpy(lanes, &a[0], sizeof(lanes));
    sink += lanes[0];
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile S keep = sink;
  (void)keep;
  return 2.0 * P::W * kPeakChains * static_cast<double>(steps) * threads / s;
}

// The best of `repeats` runs of about `seconds` each, a short first run sizing them: the arithmetic
// peak the kernels' instruction set reaches on this machine, all threads at once, float32 or float64.
template <class S>
double fma_peak_of(double seconds, int repeats, S seed) {
  const int64_t probe = 1 << 14;
  const double step_flops = 2.0 * Peak<S>::W * kPeakChains * omp_get_max_threads();
  const double steps_per_s = peak_flops<S>(probe, seed) / step_flops;
  const int64_t steps = std::max<int64_t>(probe, static_cast<int64_t>(seconds * steps_per_s));
  double best = 0;
  for (int r = 0; r < repeats; ++r) best = std::max(best, peak_flops<S>(steps, seed));
  return best;
}

double fma_peak(bool float64, double seconds, int repeats) {
  require(seconds > 0 && seconds <= 10 && repeats >= 1 && repeats <= 100,
          "fma_peak: seconds in (0, 10] and repeats in [1, 100] expected");
  volatile double seed = 1.0;  // unknown to the compiler (see peak_flops)
  py::gil_scoped_release nogil;
  if (float64) return fma_peak_of<double>(seconds, repeats, seed);
  return fma_peak_of<float>(seconds, repeats, static_cast<float>(seed));
}

}  // namespace

void init_matmul(py::module_& m);
void init_depthwise(py::module_& m);
void init_separable(py::module_& m);
void init_batchnorm(py::module_& m);
void init_im2col(py::module_& m);
}  // namespace dlk

PYBIND11_MODULE(_C, m) {
  m.doc() = "dlkernels C++ CPU kernels (pybind11, OpenMP, AVX2/FMA or AVX-512 with a scalar fallback)";
  m.def("simd", &dlk::simd_name, "instruction set the kernels were compiled for");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  m.def("get_max_threads", []() { return omp_get_max_threads(); });
  m.def("llc_bytes", &dlk::llc_bytes, "bytes of the last-level cache the kernels size their passes by");
  m.def("fma_peak", &dlk::fma_peak, pybind11::arg("float64") = false, pybind11::arg("seconds") = 0.05,
        pybind11::arg("repeats") = 5,
        "FLOP/s of multiply-add chains in registers on every OpenMP thread: the arithmetic peak the kernels' "
        "instruction set reaches here (the best of `repeats` runs of ~`seconds`)");
  dlk::init_matmul(m);
  dlk::init_depthwise(m);
  dlk::init_separable(m);
  dlk::init_batchnorm(m);
  dlk::init_im2col(m);
}
