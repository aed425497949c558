"""What every C++ kernel module (``dlkernels/<op>/cpp_impl.py``) shares: the tensor -> numpy view the
pybind11 kernels in csrc/ take."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def np_view(t: Optional[Tensor]):
    """A zero-copy numpy view of a CPU tensor (None stays None). Per-call cost is most of a small op's
    time, so detach() (another Python object, ~0.5 us) only where numpy() needs it."""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()
