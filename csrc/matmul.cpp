#include "common.h"

namespace dlk {
void init_matmul(py::module_& m) {}
}  // namespace dlk
