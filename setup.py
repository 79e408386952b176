"""fastvit: fused Triton kernels for Vision Transformers.

`kernels/` is installed as `fastvit.kernels` and `benchmarks/` as `fastvit.benchmarks`
(never as top-level `kernels` / `benchmarks`: both names belong to other PyPI projects).
"""

from pathlib import Path

from setuptools import setup

setup(
    name="fastvit",
    version="0.1.0",
    description="Fused GPU kernels (flash attention, patch embedding, LayerNorm+MLP) for Vision Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastvit",
        "fastvit.ops",
        "fastvit.nn",
        "fastvit.patching",
        "fastvit.kernels",
        "fastvit.benchmarks",
    ],
    package_dir={
        "fastvit": "fastvit",
        "fastvit.kernels": "kernels",
        "fastvit.benchmarks": "benchmarks",
    },
    install_requires=["torch>=2.11", "triton>=3.6"],
    extras_require={
        "bench": ["numpy", "matplotlib", "rich", "tqdm"],
        "test": [
            "pytest", "pytest-xdist", "pytest-benchmark", "numpy", "matplotlib", "rich", "tqdm", "ruff",
            "timm", "transformers",
        ],
        "models": ["timm", "transformers"],
    },
    entry_points={"console_scripts": ["fastvit-bench=fastvit.benchmarks.__main__:main"]},
)
