"""The checkout never shadows installed packages, and the wheel holds every part of fastvit.

``kernels`` and ``benchmarks`` are the names of other PyPI projects (transformers 5.x installs
Hugging Face's ``kernels``). Python puts the checkout root first on ``sys.path`` whenever it runs
from there, so the top-level folders ``kernels/`` and ``benchmarks/`` must not be regular packages:
they are namespace portions, installed as ``fastvit.kernels`` / ``fastvit.benchmarks``
(pyproject.toml). These tests start subprocesses in the checkout root with stand-in top-level
``kernels`` and ``benchmarks`` packages installed in a temporary site directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stand-ins for the PyPI projects: Hugging Face's `kernels` (transformers imports CUDAProperties from
# it) and `benchmarks`. `_internals` is the submodule setuptools imports for kernels' egg_info writer.
STAND_INS = {
    "kernels/__init__.py": "STAND_IN = 'kernels'\nclass CUDAProperties:\n    pass\n",
    "kernels/_internals.py": "STAND_IN = 'kernels._internals'\n",
    "benchmarks/__init__.py": "STAND_IN = 'benchmarks'\n",
}


@pytest.fixture(scope="module")
def stand_in_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    for rel, text in STAND_INS.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    return site


def _run(args: list[str], *, site: Path | None, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TRITON_INTERPRET"] = "1"  # the kernels modules import without a GPU either way
    if site is not None:
        env["PYTHONPATH"] = str(site)  # after the checkout root (sys.path[0]), like site-packages
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    tails = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tails}"
    return proc.stdout


def test_top_level_folders_are_not_regular_packages():
    """A regular package in the checkout root would win over any installed one of that name."""
    for name in ("kernels", "benchmarks"):
        assert (ROOT / name).is_dir()
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow PyPI's {name!r}"


def test_checkout_root_imports_the_installed_packages(stand_in_site: Path):
    script = """
import kernels, benchmarks, kernels._internals
assert kernels.STAND_IN == 'kernels' and benchmarks.STAND_IN == 'benchmarks', (kernels, benchmarks)
assert kernels._internals.STAND_IN == 'kernels._internals'
import torch, fastvit
import fastvit.kernels.flash_attention, fastvit.kernels.layernorm_mlp, fastvit.kernels.patch_embed
import fastvit.benchmarks.cli
assert fastvit.kernels.flash_attention.__name__ == 'fastvit.kernels.flash_attention'
q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
for route in ('torch', 'triton'):
    with fastvit.backend(route):
        assert torch.allclose(fastvit.flash_attention(q, k, v), ref, atol=1e-5), route
from tests.patching.helpers import images, timm_vit, torchvision_vit
for model in (timm_vit(), torchvision_vit()):
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        report = fastvit.patch(model)
        assert report.replaced, report
        assert torch.allclose(model(x), expected, atol=1e-4)
print('ok')
"""
    assert _ok(_run(["-c", script], site=stand_in_site)).strip().endswith("ok")


def test_transformers_imports_and_patches_from_the_checkout_root():
    """The failure of issue 11: transformers 5.x imports Hugging Face's `kernels` (installed with it),
    which the checkout's kernels/ folder shadowed."""
    pytest.importorskip("transformers")
    script = """
import torch, kernels, transformers.models.vit.modeling_vit, fastvit
from tests.patching.helpers import hf_classifier, images
model = hf_classifier().eval()
x = images()
with torch.no_grad():
    expected = model(pixel_values=x).logits
    assert fastvit.patch(model).replaced
    assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-4)
print(kernels.__file__)
"""
    out = _ok(_run(["-c", script], site=None)).strip()
    assert "site-packages" in out and not out.startswith(str(ROOT)), out


def test_benchmarks_cli_beside_installed_packages(stand_in_site: Path):
    # `python -m fastvit.benchmarks` always runs ours; the stand-in `benchmarks` stays importable.
    assert "usage: python -m benchmarks" in _ok(_run(["-m", "fastvit.benchmarks", "--help"], site=stand_in_site))
    # With only `kernels` installed (what transformers brings), `python -m benchmarks` from the
    # checkout root finds the folder's __main__.py and runs the installed fastvit.benchmarks.
    kernels_only = stand_in_site.parent / "kernels-only-site"
    if not kernels_only.exists():
        shutil.copytree(stand_in_site / "kernels", kernels_only / "kernels")
    script_args = ["-m", "benchmarks", "--help"]
    assert "usage: python -m benchmarks" in _ok(_run(script_args, site=kernels_only))


def _copy_source_tree(dest: Path) -> Path:
    """The files a clean checkout has (no build outputs, no results), symlinks kept as symlinks."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "results", ".venv", "*.so")
    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_holds_kernels_benchmarks_and_csrc(tmp_path: Path):
    """`pip wheel --no-deps .` gives one top-level package, fastvit, with fastvit.kernels,
    fastvit.benchmarks and the csrc sources; it installs and imports away from the checkout."""
    src = _copy_source_tree(tmp_path / "src")
    env = {**os.environ, "FASTVIT_BUILD_EXT": "0"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=600)
    _ok(proc)
    (wheel,) = (tmp_path / "dist").glob("fastvit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fastvit"}, tops
    for folder, package in (("kernels", "fastvit/kernels"), ("benchmarks", "fastvit/benchmarks")):
        for py in (ROOT / folder).glob("*.py"):
            assert f"{package}/{py.name}" in names, f"{package}/{py.name} missing from the wheel"
    for source in ROOT.joinpath("csrc").iterdir():
        assert f"fastvit/csrc/{source.name}" in names, f"fastvit/csrc/{source.name} missing from the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fastvit-bench = fastvit.benchmarks.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "installed"
    _ok(subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300))
    script = (
        "import fastvit, fastvit.extension as ext\n"
        "import fastvit.kernels.flash_attention as fa, fastvit.benchmarks.cli as cli\n"
        f"assert fa.__file__.startswith({str(target)!r}) and cli.__file__.startswith({str(target)!r}), fa.__file__\n"
        f"assert str(ext._csrc_dir()).startswith({str(target)!r}), ext._csrc_dir()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert _ok(proc).strip() == "ok"
