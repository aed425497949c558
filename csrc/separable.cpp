#include "common.h"

namespace dlk {
void init_separable(py::module_& m) {}
}  // namespace dlk
