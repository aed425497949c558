#include "common.h"

namespace dlk {
void init_depthwise(py::module_& m) {}
}  // namespace dlk
