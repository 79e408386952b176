"""fastvit's optional ahead-of-time build of the C++/CUDA extension; the metadata, packages and
dependencies are in pyproject.toml (which says why kernels/ and benchmarks/ have no __init__.py).
The extension sources csrc/ are package data of `fastvit.csrc`, so any install can also compile
them on first use (fastvit/extension.py).

The C++/CUDA extension `fastvit._C` is built here, ahead of time, when FASTVIT_BUILD_EXT=1, or when
that variable is unset and torch with CUDA and a CUDA toolkit (nvcc) are found while setup.py runs;
FASTVIT_BUILD_EXT=0 never builds it. pip builds in an isolated environment without torch, so the
default `pip install -e .` is pure Python; ask for the extension with
`FASTVIT_BUILD_EXT=1 pip install --no-build-isolation -e .`.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _loader():
    """fastvit/extension.py loaded on its own (it imports only torch at the top), for its source list,
    flags and CUDA toolkit probing: one definition for the JIT and the ahead-of-time build."""
    spec = importlib.util.spec_from_file_location("_fastvit_extension_for_setup", ROOT / "fastvit" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_options() -> dict:
    """setup() keywords that build `fastvit._C`, or {} for a pure-Python install."""
    flag = os.environ.get("FASTVIT_BUILD_EXT", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTVIT_BUILD_EXT must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if flag == "1":
            raise SystemExit(
                "FASTVIT_BUILD_EXT=1: building fastvit._C needs torch importable while setup.py runs, and pip "
                "builds in an isolated environment without it. Install torch first, then run\n"
                "    FASTVIT_BUILD_EXT=1 pip install --no-build-isolation -e .\n"
                f"({exc})"
            ) from exc
        return {}
    ext = _loader()
    cuda_home = ext.cuda_home()
    if flag == "" and (torch.version.cuda is None or cuda_home is None):
        return {}  # automatic: only where the CUDA kernels can be built
    cuda = cuda_home is not None
    cxx = [*ext._CXX_FLAGS] + (["-DFASTVIT_WITH_CUDA"] if cuda else [])
    sources = [os.path.relpath(p, ROOT) for p in ext.sources(cuda=cuda)]
    if not sources:
        raise SystemExit("FASTVIT_BUILD_EXT: the csrc/ sources are missing beside setup.py")
    if cuda:
        cpp_extension.CUDA_HOME = str(cuda_home)  # not the folder above a wrapper script's nvcc
        module = cpp_extension.CUDAExtension(
            name="fastvit._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": [*ext._CUDA_FLAGS]},
        )
    else:
        module = cpp_extension.CppExtension(
            name="fastvit._C", sources=sources, include_dirs=[str(ROOT / "csrc")], extra_compile_args={"cxx": cxx}
        )
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, len(sources), 8))))
    return {
        "ext_modules": [module],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_options())  # everything else is in pyproject.toml
