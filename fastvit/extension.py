"""The C++/CUDA extension ``fastvit._C`` (sources in ``csrc/``): finding, building and loading it.

The extension registers the ``torch.ops.fastvit_C`` ops (LayerNorm, bias + GELU, the scaled
residual add, patchify / unpatchify and the LayerNorm+MLP and patch-embed composites; schemas in
``csrc/README.md``) with the PyTorch dispatcher. It comes from one of two places, tried in order:

1. ``import fastvit._C``: built ahead of time by ``setup.py`` (``FASTVIT_BUILD_EXT=1 pip install
   --no-build-isolation -e .``).
2. The JIT cache ``<fastvit.cache.cache_dir()>/extension/<tag>/``: compiled with ninja through
   ``torch.utils.cpp_extension.load`` on first use and reused after. The tag names the Python,
   torch and CUDA versions and hashes the sources and flags, so a build never meets a torch,
   Python or source tree it was not compiled for.

``load()`` compiles when asked to (``build=True``), or by default on a machine with a GPU. With
nvcc (a CUDA toolkit) the build holds the CUDA kernels for sm_80, sm_89 and sm_90 (+ sm_90 PTX);
without it, only the CPU loops and composites. Concurrent builds (pytest-xdist workers, several
jobs on one cache) are serialised by an OS file lock on the build folder, which the kernel
releases if its holder dies, so a killed build never blocks later ones.

After a successful load the fake (meta) implementations of every op are registered, so
``torch.compile`` traces them.

Example:
    >>> from fastvit import extension
    >>> if extension.load(build=True):
    ...     y, mean, rstd = torch.ops.fastvit_C.layer_norm_fwd(x2d, w, b, 1e-6, torch.bfloat16)
    ... else:
    ...     print(extension.unavailable_reason())
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = [
    "CUDA_ARCH_FLAGS",
    "available",
    "build_tag",
    "cuda_home",
    "has_cuda_kernels",
    "load",
    "sources",
    "unavailable_reason",
]

_NAME = "fastvit_C"  # the library name of the JIT build (its TORCH_EXTENSION_NAME)
_CPU_SOURCES = ("cpu_loops.cpp", "ops.cpp", "module.cpp")
_CUDA_SOURCES = ("ops_cuda.cpp",)  # plus every *_kernels.cu
_HEADER_GLOBS = ("*.h", "*.cuh")

# sm_80 (A100), sm_89 (L4 / L40 / RTX 40), sm_90 (H100 / H200) machine code, plus sm_90 PTX for newer GPUs.
CUDA_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_89,code=sm_89",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
# No -std flag: torch.utils.cpp_extension picks the C++ standard its headers need (C++20 since torch
# 2.10; csrc/ is C++17-clean).
_CXX_FLAGS = ("-O3",)
_CUDA_FLAGS = ("-O3", *CUDA_ARCH_FLAGS)

_lock = threading.Lock()
_loaded = False
_cuda_kernels = False
_probed = False  # the no-build probe (fastvit._C, then the cache) ran and found nothing
_NOT_RUN = "fastvit.extension.load() has not run"
_reason: str | None = _NOT_RUN
_build_error: str | None = None  # a failed build is not retried in the same process


# ---------------------------------------------------------------------------------------------
# Sources, toolkit, tag
# ---------------------------------------------------------------------------------------------
def _csrc_dir() -> Path | None:
    """csrc/ next to the package: ``fastvit/csrc`` (installed as package data, pyproject.toml) or the
    repository's ``csrc/`` (a checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "ops.cpp").is_file() and (candidate / "row_math.h").is_file():
            return candidate
    return None


def sources(cuda: bool) -> list[Path]:
    """The translation units of the extension, found next to the package.

    Args:
        cuda: include the CUDA side (``ops_cuda.cpp`` and every ``*_kernels.cu``).

    Returns:
        Absolute paths, CPU sources first; empty when the sources are not shipped with this install.

    Example:
        >>> [p.name for p in fastvit.extension.sources(cuda=False)]
        ['cpu_loops.cpp', 'ops.cpp', 'module.cpp']
    """
    root = _csrc_dir()
    if root is None:
        return []
    files = [root / name for name in _CPU_SOURCES]
    if cuda:
        files += [root / name for name in _CUDA_SOURCES] + sorted(root.glob("*_kernels.cu"))
    return files


def _headers(root: Path) -> list[Path]:
    return sorted({h for pattern in _HEADER_GLOBS for h in root.glob(pattern)})


def build_tag(source_files: Sequence[Path], cuda: bool) -> str:
    """The cache folder name of a build: Python, torch and CUDA versions, the device side, and a hash
    of the sources (with the headers beside them) and the compile flags.

    Args:
        source_files: the translation units (``sources(cuda)``).
        cuda: whether the build holds the CUDA kernels.

    Returns:
        e.g. ``"py311-torch2.14.1_cu130-cu13.0-cuda-3f2a9c0d1e4b5a6c"``.

    Example:
        >>> fastvit.extension.build_tag(fastvit.extension.sources(cuda=False), cuda=False)
        'py311-torch2.14.1_cu130-cu13.0-cpu-...'
    """
    digest = hashlib.sha256()
    files = {Path(f) for f in source_files}
    for folder in {Path(f).parent for f in source_files}:
        files.update(_headers(folder))
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f.name.encode())
        digest.update(b"\0")
        digest.update(f.read_bytes())
        digest.update(b"\0")
    digest.update(repr((_CXX_FLAGS, _CUDA_FLAGS if cuda else ())).encode())
    torch_version = torch.__version__.replace("+", "_")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"{py}-torch{torch_version}-cu{torch.version.cuda or 'none'}-{'cuda' if cuda else 'cpu'}-" + (
        digest.hexdigest()[:16]
    )


def cuda_home() -> Path | None:
    """The CUDA toolkit to build with: the first of ``$CUDA_HOME``, ``$CUDA_PATH``,
    ``/usr/local/cuda`` and the folder above nvcc's ``bin/`` (on PATH, links resolved) that has
    ``bin/nvcc``, ``include/cuda_runtime.h`` and the cudart library; None without one, or when torch
    has no CUDA.

    (torch.utils.cpp_extension takes the folder above the first nvcc on PATH, which is wrong when
    that nvcc is a wrapper script, e.g. /usr/local/bin/nvcc: the link then fails on -lcudart.)

    Example:
        >>> fastvit.extension.cuda_home()
        PosixPath('/usr/local/cuda')
    """
    if torch.version.cuda is None:
        return None
    candidates: list[str | None] = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [str(Path(nvcc).parent.parent), str(Path(nvcc).resolve().parent.parent)]
    exe = "nvcc.exe" if os.name == "nt" else "nvcc"
    cudart = ("lib64/libcudart.so", "lib/libcudart.so", "lib/x64/cudart.lib")
    for candidate in candidates:
        if not candidate:
            continue
        home = Path(candidate)
        if (
            (home / "bin" / exe).is_file()
            and (home / "include" / "cuda_runtime.h").is_file()
            and any((home / lib).exists() for lib in cudart)
        ):
            return home
    return None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _library_path(build_dir: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return build_dir / f"{_NAME}{LIB_EXT}"


def _stamp_path(library: Path) -> Path:
    return library.with_name(library.name + ".complete")


def _stamp(library: Path) -> str:
    stat = library.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def _complete(library: Path) -> bool:
    """The library exists and is the one a finished build stamped: a link killed half-way leaves a
    truncated file that would crash dlopen (SIGBUS), not raise."""
    try:
        return _stamp_path(library).read_text(encoding="utf-8") == _stamp(library)
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """An exclusive OS lock on ``build_dir/build.lock`` (flock: released by the kernel if we die)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock in cpp_extension.load serialises builds
        yield
        return
    with open(build_dir / "build.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            # Older torch (FileBaton) blocks on a bare "lock" file left by a killed build; we hold the
            # real lock, so any such file is stale.
            with contextlib.suppress(FileNotFoundError):
                (build_dir / "lock").unlink()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_environment(cuda_root: Path | None, jobs: int) -> Iterator[None]:
    """Point torch.utils.cpp_extension at the right CUDA toolkit and bound ninja's parallelism."""
    import torch.utils.cpp_extension as cpp_extension

    saved_home, saved_jobs = cpp_extension.CUDA_HOME, os.environ.get("MAX_JOBS")
    if cuda_root is not None:
        cpp_extension.CUDA_HOME = str(cuda_root)
    if saved_jobs is None:
        os.environ["MAX_JOBS"] = str(jobs)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        if saved_jobs is None:
            os.environ.pop("MAX_JOBS", None)


def _compile(files: list[Path], build_dir: Path, cuda_root: Path | None) -> Path:
    """Compile and link the extension into build_dir with ninja; returns the library's path."""
    import torch.utils.cpp_extension as cpp_extension

    cuda = cuda_root is not None
    cflags = [*_CXX_FLAGS] + (["-DFASTVIT_WITH_CUDA"] if cuda else [])
    # each nvcc/c++ job holding the torch headers needs ~1-2 GB: one job per core, at most 8
    jobs = max(1, min(os.cpu_count() or 1, len(files), 8))
    with _build_lock(build_dir), _build_environment(cuda_root, jobs):
        library = _library_path(build_dir)
        if _complete(library):  # another process built it while we waited for the lock
            return library
        library.unlink(missing_ok=True)  # absent, or left incomplete by a killed build: relink
        cpp_extension.load(
            name=_NAME,
            sources=[str(f) for f in files],
            extra_cflags=cflags,
            extra_cuda_cflags=[*_CUDA_FLAGS] if cuda else None,
            extra_include_paths=[str(files[0].parent)],
            build_directory=str(build_dir),
            with_cuda=cuda,
            is_python_module=False,
            verbose=False,
        )
        _stamp_path(library).write_text(_stamp(library), encoding="utf-8")
    return library


def _compiler_problem() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (from $CXX, default c++) is not on PATH"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _finish_load(cuda_in_build: bool) -> bool:
    global _loaded, _cuda_kernels, _reason
    _loaded = True
    _cuda_kernels = cuda_in_build and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastvit_C::layer_norm_fwd", "CUDA"
    )
    _reason = None
    from fastvit.ops import _extension_fakes

    _extension_fakes.register()
    return True


def _ops_registered() -> bool:
    from fastvit.ops._extension_fakes import _ops_loaded

    return _ops_loaded()


def _load_locked(build: bool | None) -> bool:
    global _probed, _reason, _build_error
    from fastvit.cache import cache_dir  # imported here: setup.py loads this file standalone

    if _ops_registered():  # loaded by other means (torch.ops.load_library): loading again would clash
        return _finish_load(cuda_in_build=True)
    if not _probed:
        try:
            importlib.import_module("fastvit._C")
            return _finish_load(cuda_in_build=True)
        except ImportError as exc:
            if getattr(exc, "name", None) != "fastvit._C":  # a stale or broken ahead-of-time build
                _reason = f"import fastvit._C failed: {exc}"
    cuda_root = cuda_home()
    files = sources(cuda=cuda_root is not None)
    if not files:
        _reason = "the csrc/ sources are not installed beside fastvit (fastvit/csrc or the checkout's csrc/)"
        return False
    build_dir = cache_dir() / "extension" / build_tag(files, cuda=cuda_root is not None)
    library = _library_path(build_dir)
    if not _probed and _complete(library):
        try:
            torch.ops.load_library(str(library))
            return _finish_load(cuda_in_build=cuda_root is not None)
        except (OSError, RuntimeError) as exc:
            _reason = f"the cached build {library} does not load: {exc}"
            return False
    _probed = True
    if build is None:
        build = torch.cuda.is_available()
    if not build:
        if _reason in (None, _NOT_RUN):  # keep a more specific reason found above (a broken fastvit._C)
            _reason = (
                f"not built: no fastvit._C module and no cached build in {build_dir}; "
                "call fastvit.extension.load(build=True) to compile it"
            )
        return False
    if _build_error is not None:
        _reason = _build_error
        return False
    problem = _compiler_problem()
    if problem is not None:
        _reason = _build_error = problem
        return False
    try:
        library = _compile(files, build_dir, cuda_root)
        torch.ops.load_library(str(library))
    except Exception as exc:  # any build failure makes the backend unavailable, with its log
        log = str(exc)
        with contextlib.suppress(OSError):
            (build_dir / "last_error.log").write_text(log, encoding="utf-8")
        _reason = _build_error = f"building the extension in {build_dir} failed: ...{log[-3000:]}"
        return False
    return _finish_load(cuda_in_build=cuda_root is not None)


def load(build: bool | None = None) -> bool:
    """Make ``torch.ops.fastvit_C`` usable: import the ahead-of-time build, or load / compile the JIT one.

    Args:
        build: compile the extension if no build is found. None (default): compile only on a machine
            with a CUDA GPU (compile on first use); False: never compile.

    Returns:
        True when the ops are registered (``unavailable_reason()`` says why not otherwise). Thread-safe;
        after the first success it returns at once. A failed build is not retried in the same process.

    Example:
        >>> fastvit.extension.load(build=True)   # ~2-5 min the first time (ninja), then cached
        True
    """
    if _loaded:
        return True
    with _lock:
        if _loaded:
            return True
        return _load_locked(build)


def available() -> bool:
    """True when the extension loads without being compiled here, or compiles on first use because a GPU
    is present: ``load(build=None)``.

    Example:
        >>> fastvit.extension.available()
        False
    """
    return load(build=None)


def unavailable_reason() -> str | None:
    """Why the extension is not loaded (no compiler, no build yet, the build failed with its log tail,
    ...), or None when it is.

    Example:
        >>> fastvit.extension.unavailable_reason()
        'not built: no fastvit._C module and no cached build in ...; call fastvit.extension.load(build=True) ...'
    """
    return None if _loaded else _reason


def has_cuda_kernels() -> bool:
    """True when the loaded build holds the CUDA implementations of the block ops (built with nvcc).

    Example:
        >>> fastvit.extension.load() and fastvit.extension.has_cuda_kernels()
        True
    """
    return _loaded and _cuda_kernels


if _ops_registered():  # the library was loaded before this module was imported: the same state as after load()
    _finish_load(cuda_in_build=True)
