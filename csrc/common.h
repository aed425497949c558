// Shared helpers for the dlkernels C++ kernels.
//
// The kernels never link against libtorch: Python hands them numpy views of CPU tensors
// (zero copy) after dlkernels/_validation.py has checked dtype, shape and sizes. The checks
// here are a second fence, so that a caller bypassing the Python layer still gets an
// exception instead of a read or write outside the buffers it passed.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dlk {

namespace py = pybind11;

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("dlkernels._C: " + msg);
}

// Element strides of a numpy array (numpy stores byte strides).
inline int64_t elem_stride(const py::array& a, int dim) {
  return static_cast<int64_t>(a.strides(dim)) / static_cast<int64_t>(a.itemsize());
}

inline bool is_float32(const py::array& a) { return a.dtype().is(py::dtype::of<float>()); }
inline bool is_float64(const py::array& a) { return a.dtype().is(py::dtype::of<double>()); }

// Whether a pass over `elements` values is worth a parallel region: starting and joining the
// OpenMP team costs microseconds quiet and milliseconds on a loaded machine (threads that lost
// their core), more than a small layer's whole pass. Use as `#pragma omp parallel if (...)`.
inline bool worth_threads(int64_t elements) { return elements >= (int64_t{1} << 15); }

// The same for compute-bound work (GEMMs, the fused separable conv): below this many multiply-adds
// (~50 us on one core) a second thread saves less than waking it can cost.
constexpr int64_t kMinParallelMacs = 128 * 128 * 128;

// The instruction set this module was compiled for, reported by dlkernels._C.simd().
inline const char* simd_name() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2-fma";
#else
  return "scalar";
#endif
}

}  // namespace dlk
