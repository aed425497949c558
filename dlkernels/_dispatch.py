"""Which backend runs an op: the one place that decides.

Precedence, most specific first:
  1. the op's ``backend=`` keyword,
  2. ``with dlkernels.use_backend(name):``,
  3. the environment variable ``DLKERNELS_BACKEND``,
  4. auto: CUDA tensors run on Triton; CPU tensors on the CPU backend measured fastest for that op
     (``CPU_AUTO`` below, from the committed benchmark results in benchmarks/results/).

``"torch"`` is the reference: PyTorch's own ops, with PyTorch's autograd.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("triton", "numba", "cpp", "torch")
CPU_BACKENDS = ("numba", "cpp")

# CPU backend chosen by "auto" per op family, from benchmarks/results/ (CPU report). An op family
# missing here falls back to the first available of CPU_BACKENDS' order below.
CPU_AUTO = {
    "matmul": "cpp",
    "depthwise": "cpp",
    "separable": "cpp",
    "batchnorm": "cpp",
}
_CPU_FALLBACK_ORDER = ("cpp", "numba", "torch")

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("dlkernels_backend", default=None)


# The numba backend in a forked process (a DataLoader worker, multiprocessing's default start on Linux).
# GNU OpenMP cannot start threads in a child forked from a process that used it, and torch and the cpp
# backend share its runtime: a worker's first parallel Numba kernel hung there (torch's ops and the cpp
# kernels run on the one thread DataLoader gives a worker). A child whose Numba has not started its
# threads takes Numba's workqueue layer (fork-safe; not for calls from several threads at once), unless
# NUMBA_THREADING_LAYER says otherwise; a child whose parent had started Numba's OpenMP threads cannot
# run its kernels at all (Numba terminates it): the numba backend raises numba_fork_error there.
forked = False  # this process is a child forked from one that imported dlkernels
numba_fork_error: str | None = None


def numba_after_fork() -> None:
    """Numba's threading layer for a forked child: now where Numba is imported, else when the numba
    backend first imports it (dlkernels/_numba_common.py)."""
    global numba_fork_error
    numba = sys.modules.get("numba")
    if numba is None:
        return
    if not getattr(sys.modules.get("numba.np.ufunc.parallel"), "_is_initialized", False):
        if "NUMBA_THREADING_LAYER" not in os.environ:  # a layer the user chose stands
            numba.config.THREADING_LAYER = "workqueue"
    elif numba.threading_layer() == "omp":
        numba_fork_error = (
            "dlkernels: the numba backend cannot run in this process, forked from one whose Numba had started "
            "GNU OpenMP threads (not fork-safe). Start workers with 'spawn' or 'forkserver' (DataLoader("
            "multiprocessing_context='spawn')), or use backend='cpp' in them")


def _after_fork_in_child() -> None:
    global forked
    forked = True
    numba_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@functools.cache
def _cpp_loads() -> bool:
    try:
        importlib.import_module("dlkernels._C")
    except ImportError:
        return False
    return True


def _backend_installed(name: str) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return _cpp_loads()
    if name == "numba":
        return _has_module("numba")
    if name == "triton":
        return _has_module("triton")
    return False


def _runs_on(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name in CPU_BACKENDS:
        return device_type == "cpu"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable here: installed, and able to run on ``device`` (default: CUDA if present, and CPU)."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [b for b in BACKENDS if _backend_installed(b) and any(_runs_on(b, t) for t in types)]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``None`` or ``"auto"``: automatic choice)."""
    if name is not None and name != "auto":
        _check_name(name)
        if not _backend_installed(name):
            raise RuntimeError(_unavailable_msg(name, None))
    token = _scoped.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _scoped.reset(token)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"dlkernels: unknown backend {name!r}; expected one of {list(BACKENDS)} or 'auto'")


def _unavailable_msg(name: str, device_type: str | None) -> str:
    where = f" for {device_type} tensors" if device_type else ""
    have = available_backends(device_type)
    if name == "triton" and device_type == "cpu" and _has_module("triton"):
        why = ("triton runs on CUDA tensors; on the CPU only through its interpreter, which needs "
               "TRITON_INTERPRET=1 set before triton is imported")
    elif name in CPU_BACKENDS and device_type not in (None, "cpu"):
        why = f"{name} runs on CPU tensors only"
    elif not _backend_installed(name):
        why = "cpp needs the compiled extension dlkernels._C (make setup)" if name == "cpp" else \
            f"the package {name!r} is not installed"
    else:
        why = "it cannot run here"
    return f"dlkernels: backend {name!r} is not available{where}: {why}. Available{where}: {have}"


_ENV_KEY = "DLKERNELS_BACKEND"
_ENV_KEY_BYTES = os.fsencode(_ENV_KEY)


def _env_backend() -> str | None:
    """DLKERNELS_BACKEND as os.environ holds it now. Read from os.environ's own dict (bytes keys on POSIX),
    which os.environ's setters and deleters keep (so monkeypatch.setenv and the like are seen): the
    mapping's get() costs Python frames and, on a miss, two raised KeyErrors, 26-33 us after a
    layer-sized pass has been through the caches (every op call reads it), the dict 0.6."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get(_ENV_KEY)
    raw = data.get(_ENV_KEY_BYTES)
    return None if raw is None else os.fsdecode(raw)


_CPU = torch.device("cpu")


def _device_type(device: torch.device) -> str:
    """``device.type``, without building that string for the CPU: torch.device.type makes a new str
    through c10's DeviceTypeName on each access, 29 us the first time after a layer-sized pass has
    flushed the caches (Zen4), where comparing the device with a CPU one costs 1."""
    return "cpu" if device == _CPU else device.type


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)``, without importing torch._dynamo (1.1 s, 40 % of
    ``import dlkernels``, Zen4) in a process that has not: that function imports it only to set this
    attribute, which Dynamo reads when it traces a call (tests/test_dispatch.py checks the two agree)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(family: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs an op of ``family`` on tensors of ``device``.

    Under torch.compile the choice is made once, when the function is traced (a constant of the graph).
    """
    name = backend or _scoped.get() or _env_backend() or "auto"
    dev_type = _device_type(device)
    if name == "auto":
        if dev_type == "cuda" and _backend_installed("triton"):
            return "triton"
        if dev_type == "cpu":
            preferred = CPU_AUTO.get(family)
            for cand in ((preferred,) if preferred else ()) + _CPU_FALLBACK_ORDER:
                if _backend_installed(cand):
                    return cand
        return "torch"
    _check_name(name)
    if not (_backend_installed(name) and _runs_on(name, dev_type)):
        raise RuntimeError(_unavailable_msg(name, dev_type))
    return name


@functools.cache
def _kernel_module(family: str, backend: str) -> ModuleType:
    return importlib.import_module(f"dlkernels.{family}.{backend}_impl")


def kernels(family: str, backend: str, device: torch.device) -> ModuleType:
    """The module that holds ``family``'s kernels for ``backend``: ``dlkernels/<family>/<backend>_impl.py``.

    Checked again here (not only in ``resolve``) because torch.ops.dlkernels.* can be called directly.
    """
    if backend == "torch" or backend not in BACKENDS:
        raise ValueError(f"dlkernels: the custom ops run backends {[b for b in BACKENDS if b != 'torch']}; "
                         f"got {backend!r} (backend 'torch' is PyTorch's own ops, called without them)")
    dev_type = _device_type(device)
    if not (_backend_installed(backend) and _runs_on(backend, dev_type)):
        raise RuntimeError(_unavailable_msg(backend, dev_type))
    return _kernel_module(family, backend)
