"""Test set-up: pick the kernel device, make unwritten kernel outputs visible, seed each test.

Without a GPU, the Triton kernels run in Triton's interpreter. ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates a kernel (at import), so it is set here, before any test imports
fastvit. Ahead-of-time compile checks run in a subprocess with the variable unset.
"""

import os
import sys
import zlib

# The interpreter runs each tl.dot as a small NumPy matmul: a multithreaded BLAS spins on those and
# slows the interpreter tests ~3x on a small machine. Set before NumPy or torch is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

# Under xdist (-n auto: a worker per core) each worker's torch would start a thread per core too:
# the workers' thread pools then fight over the cores, and the suite runs ~15% slower on a 2-core
# machine (measured on 4 patching test files: 70 s against 83-101 s). One share of the cores each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels in the interpreter (CPU only)")
    config.addinivalue_line("markers", "slow: long-running; still part of the default run")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="a GPU is present: kernels are tested compiled, not interpreted")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and HAS_CUDA:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _rng_seeded_per_test(request):
    """The global RNG seeded from the test's own id before it runs: the checks against the float64
    reference keep a statistical margin, so a test draws the same random tensors (an upstream
    gradient from ``torch.randn_like``) alone, in any order and on any xdist worker."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_dynamo_after_a_compile():
    """A test that ran dynamo (torch.compile, torch.export) leaves it reset. Dynamo keys its caches
    by code object, and a timm forward (``Block.forward``) serves many models: one compiled by an
    earlier test made dynamo compile the next model's with dynamic shapes ("automatic dynamic"), a
    far slower compile whose cost hung on which tests an xdist worker happened to run before
    (HieraDet's fullgraph compile: 1.6-2.1 s after other models' compiles, 176 s after timm_blocks'
    HieraDet compile). A worker that never loaded dynamo does not import it here."""
    yield
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    if convert_frame is not None and convert_frame.FRAME_COUNTER:  # frames converted since the last reset
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """Every launcher's outputs start as NaN, so elements a kernel never writes fail the checks."""
    from fastvit.kernels import runtime

    runtime.FILL_OUTPUTS_WITH_NAN = True
    yield
    runtime.FILL_OUTPUTS_WITH_NAN = False


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels run: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def tma_forward(kernel_device, monkeypatch) -> list:
    """The attention forward's tensor-descriptor (TMA) path, taken where it exists: Hopper on a GPU
    (skipped on other GPUs), and in the interpreter when asked. Returns the list that records each
    ``fwd_tma_descriptors`` call, so a test can assert the path ran."""
    from fastvit.kernels import flash_attention as kernels

    if HAS_CUDA and kernels.arch_of(kernel_device) // 10 != 9:
        pytest.skip("tensor descriptors are Hopper's")
    monkeypatch.setattr(kernels, "INTERPRETER_TMA", True)
    monkeypatch.setenv("FASTVIT_TMA", "1")  # off by default on a GPU
    used = []
    original = kernels.fwd_tma_descriptors
    monkeypatch.setattr(kernels, "fwd_tma_descriptors", lambda *a: used.append(1) or original(*a))
    return used


@pytest.fixture
def lazy_rescale(monkeypatch) -> list:
    """Every attention forward launch rescales lazily (``LAZY_RESCALE``; in the interpreter the tiles
    hold too few values a thread for ``lazy_rescale``'s rule, and on a GPU small head dims do too).
    Returns the list that records each forward launch's ``LAZY_RESCALE``, so a test can assert the
    path ran."""
    from fastvit.kernels import flash_attention as kernels
    from tests.launches import LaunchRecorder

    monkeypatch.setattr(kernels, "lazy_rescale", lambda cfg, head_dim_pad, dtype: True)
    launched: list = []
    recorder = LaunchRecorder(kernels.flash_attention_fwd_kernel, "fwd", launched, keyword="LAZY_RESCALE")
    monkeypatch.setattr(kernels, "flash_attention_fwd_kernel", recorder)
    return launched


@pytest.fixture(scope="session")
def cuda_extension():
    """The C++/CUDA extension ``fastvit._C``, built here on first use (cached in the user's cache
    folder; pytest-xdist workers wait on the build lock). A machine with a C++ compiler must build
    it — a failure there is a failure, not a skip."""
    import shutil

    from fastvit import extension

    if not extension.load(build=True):
        reason = extension.unavailable_reason()
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"the extension fastvit._C did not build or load: {reason}")
        pytest.skip(f"no C++ compiler: {reason}")
    return extension
