"""Test set-up shared by every test file.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter, which must be switched
on before triton is imported (torch may import it lazily, so this runs before anything else).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("DLKERNELS_TEST_CUDA") else "1")
# On CUDA each kernel runs its default config: tuning every test shape would compile every config.
os.environ.setdefault("DLKERNELS_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import DEVICE, KERNEL_BACKENDS  # noqa: E402

# torch's convolutions on CUDA multiply float32 in TF32 unless told not to (cudnn.allow_tf32 is True
# by default, unlike matmul's), while the kernels follow torch.get_float32_matmul_precision()
# ("highest": full float32). A float32 reference computed by cuDNN was then the less accurate side:
# the separable test_non_finite_values failed on an H200 (pointwise weight gradient off by 4.5 %
# relative at one element, 2026-11-26).
torch.backends.cudnn.allow_tf32 = False


def pytest_runtest_logreport(report):
    """DLKERNELS_FAILURE_LOG=path: each failure's traceback is appended there as it happens (under
    xdist too), so a run stopped by a time limit, as on a lent GPU, still says why tests failed."""
    path = os.environ.get("DLKERNELS_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # the controller writes it once
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_report_header(config):
    return f"dlkernels: device {DEVICE}, backends {KERNEL_BACKENDS}, torch {torch.__version__}"


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def on_test_device():
    """Tensors and modules a test creates land on the device under test (CUDA in a GPU run) unless it
    says otherwise: for tests written against factory defaults, parametrized over backends that only
    run there."""
    with torch.device(DEVICE):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
