// The extension dlkernels._C: one init function per op family, each in its own file.
#include "common.h"

#include <omp.h>

namespace dlk {
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
  dlk::init_matmul(m);
  dlk::init_depthwise(m);
  dlk::init_separable(m);
  dlk::init_batchnorm(m);
  dlk::init_im2col(m);
}
