"""The machine a run measures on: its description, its allocator setting and its own limits.

The limits (copy bandwidth; on a CPU the arithmetic peak, on a GPU a large matmul's FLOP/s) are
measured at the start of every run, on the same machine, so each case's achieved GB/s or FLOP/s is
stated as a fraction of what this machine did.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

from typing import Callable

import torch

# glibc's mallopt parameters (malloc.h). Raised so that freed large buffers stay in the process:
# by default every new op output is a fresh mmap whose page faults land inside the timed call
# (eager relu(bn(x)+r) at 8x256x56x56 here: 24 ms default, 5.7 ms with these set).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {"M_MMAP_THRESHOLD": 1_000_000_000, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 256 << 20}


def configure_malloc() -> str:
    """Apply MALLOC_SETTINGS to this process through mallopt(3); returns what was done, for the report.

    mallopt at run time rather than the MALLOC_*_ environment variables: glibc (2.36 here) drops
    MALLOC_MMAP_THRESHOLD_ values above 32 MiB without a word, and layer outputs are larger.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default allocator (mallopt unavailable: not glibc)"
    keys = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}
    done = [f"{k}={v}" for k, v in MALLOC_SETTINGS.items() if mallopt(keys[k], v) == 1]
    if len(done) != len(MALLOC_SETTINGS):
        return f"glibc mallopt partly applied ({', '.join(done) or 'none'}); timings may include page faults"
    return "glibc mallopt(" + ", ".join(done) + ") for every contender alike (large buffers reused, no page faults)"


def llc_bytes() -> int:
    """Last-level cache size from sysfs (CPU), or the GPU's L2 size."""
    path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    try:
        text = open(path).read().strip()
    except OSError:
        return 32 << 20
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    if not m:
        return 32 << 20
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break
            key, _, val = line.partition(":")
            fields[key.strip()] = val.strip()
    except OSError:
        pass
    return fields


def cpu_isa(info: dict[str, str] | None = None) -> str:
    """The widest vector instruction set the CPU has (info: _cpuinfo()'s fields), as the C++
    kernels are built for it (-march=native): "avx512", "avx2", or "" (neither, or not x86)."""
    flags = set((_cpuinfo() if info is None else info).get("flags", "").split())
    return "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else ""


def amd_core(family: int, model: int) -> str:
    """The Zen generation of an AMD x86 family/model ("" if unknown): VMs name a Zen3, a Zen4 and a
    Zen5 all "AMD EPYC", and the last two both have AVX-512 (Zen4 at half the FMA width)."""
    if family == 23:
        return "zen2" if model >= 0x30 else "zen"
    if family == 25:
        return "zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "zen3"
    return "zen5" if family == 26 else ""


def cpu_name() -> str:
    """The CPU's model name, with its x86 family/model and vector ISA where known: VMs report
    "AMD EPYC" for a Zen3 (AVX2) and a Zen5 (AVX-512) alike, and their results differ."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    detail = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    isa = cpu_isa(info)
    detail += [{"avx512": "AVX-512", "avx2": "AVX2/FMA"}[isa]] if isa else []
    return f"{name} ({', '.join(detail)})" if detail else name


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is reported, not fatal
        return "not installed"


@dataclass
class MachineInfo:
    device: str                # "cpu" or "cuda"
    device_name: str
    cpu: str
    cores: int
    torch_threads: int
    llc_bytes: int
    versions: dict
    date: str
    allocator: str
    fp32_matmul_precision: str
    extra: dict = field(default_factory=dict)

    def slug(self) -> str:
        """Directory name under benchmarks/results/ for this machine."""
        name = self.device_name if self.device == "cuda" else re.sub(r"\s*\((?!R\)|TM\)).*\)$", "", self.cpu)
        name = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*$|\d+-Core", "", name)
        if self.device != "cuda":  # one folder per core and ISA: same-named VMs differ (see cpu_name)
            fm = re.search(r"family (\d+) model (\d+)", self.cpu)
            core = amd_core(int(fm[1]), int(fm[2])) if fm and "AMD" in self.cpu else ""
            name += f" {core}" if core else ""
            name += " avx512" if "AVX-512" in self.cpu else " avx2" if "AVX2" in self.cpu else ""
        return f"{self.device}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")

    def to_dict(self) -> dict:
        return asdict(self)


def describe(device: torch.device, allocator: str) -> MachineInfo:
    cuda = device.type == "cuda"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name, llc = props.name, int(getattr(props, "L2_cache_size", 50 << 20))
    else:
        name, llc = cpu_name(), llc_bytes()
    versions = {m: _version(m) for m in ("torch", "triton", "numba", "numpy")}
    versions["python"] = platform.python_version()
    if cuda:
        versions["cuda"] = torch.version.cuda
    return MachineInfo(
        device=device.type, device_name=name, cpu=cpu_name(), cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(), llc_bytes=llc, versions=versions,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        allocator=allocator if not cuda else "PyTorch CUDA caching allocator",
        fp32_matmul_precision=torch.get_float32_matmul_precision(),
    )


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Limits:
    copy_bytes_per_s: float        # read + write bytes per second of a large torch copy: the best seen
    copy_size_bytes: int
    matmul_flops: dict             # dtype name -> FLOP/s of a large torch.matmul
    matmul_size: int
    copy_samples: list = field(default_factory=list)  # every copy measurement of the run, in order
    # dtype name -> FLOP/s of multiply-add chains in registers on every thread (CPU: dlkernels._C.fma_peak,
    # the C++ build's vector ISA): what compute-bound cases are held to there. A torch.matmul is a
    # contender, not a limit: the C++ GEMM ran at 1.17x its rate (Zen4), "117 % of the limit".
    peak_flops: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def add_copy(self, bytes_per_s: float) -> None:
        """Another copy measurement. The limit is the best of them: a shared host's bandwidth moves
        within minutes (the Zen5 VM between ~42 and ~80 GB/s), and a figure from a slow moment put
        passes measured in a fast one at up to 207 % of "the limit"."""
        self.copy_samples.append(bytes_per_s)
        self.copy_bytes_per_s = max(self.copy_samples)


_COPY_BUFFERS: dict = {}


def copy_call(device: torch.device, llc: int) -> tuple[Callable[[], object], int]:
    """(a torch copy well past the last-level cache, bytes it copies); its buffers are kept for the
    next call (the bench also times it beside each memory-bound CPU case)."""
    nbytes = max(8 * llc, 256 << 20)
    key = (str(device), nbytes)
    if key not in _COPY_BUFFERS:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        _COPY_BUFFERS[key] = (src, torch.empty_like(src))
    src, dst = _COPY_BUFFERS[key]
    return (lambda: dst.copy_(src)), nbytes


def copy_rate(device: torch.device, llc: int, quick: bool = False) -> tuple[float, int]:
    """(read + write bytes per second, bytes copied) of a torch copy well past the last-level cache."""
    call, nbytes = copy_call(device, llc)
    t = _median_time(call, device, 5 if quick else 11)
    return 2 * nbytes / t, nbytes


def measure_limits(device: torch.device, dtypes: list[torch.dtype], llc: int, quick: bool = False) -> Limits:
    """A large copy (well past the last-level cache), a large torch.matmul per dtype and, on a CPU, the
    arithmetic peak."""
    rate, nbytes = copy_rate(device, llc, quick)
    n = (8192 if device.type == "cuda" else 2048) // (2 if quick else 1)
    flops = {}
    for dt in dict.fromkeys([torch.float32, *dtypes]):
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        tm = _median_time(lambda: torch.matmul(a, b), device, 3 if quick else 7)
        flops[str(dt).removeprefix("torch.")] = 2 * n**3 / tm
    return Limits(copy_bytes_per_s=rate, copy_size_bytes=nbytes, matmul_flops=flops, matmul_size=n,
                  copy_samples=[rate], peak_flops=arithmetic_peak(device, dtypes, quick))


def arithmetic_peak(device: torch.device, dtypes: list[torch.dtype], quick: bool = False) -> dict:
    """dtype name -> the CPU's arithmetic peak in FLOP/s (see Limits.peak_flops), for the dtypes the C++
    kernels compute in; empty on a GPU or without the C++ extension."""
    if device.type != "cpu":
        return {}
    try:
        from .. import _C
    except ImportError:
        return {}
    return {str(dt).removeprefix("torch."): _C.fma_peak(dt == torch.float64, 0.02 if quick else 0.05)
            for dt in dict.fromkeys([torch.float32, *dtypes]) if dt in (torch.float32, torch.float64)}
