"""The static GPU report, on this machine without a GPU: every Triton kernel configuration and every
csrc/*_kernels.cu kernel compiles for sm_80, sm_89 and sm_90 without register spills, within each
architecture's shared memory, and every fp16/bf16 matmul-bound kernel uses warpgroup MMA (HGMMA)
on sm_90; the performance model finds no problem that the committed figures
(benchmarks/results/static/figures-triton-<version>.json) do not already list, and every figure
matches them, so that a change of registers, occupancy, MMA shapes or issue ratio shows in review.

The compile runs once per test session, as a user runs it: ``python -m benchmarks static --json
--figures`` in a subprocess (Triton compiles need TRITON_INTERPRET unset, and this process
interprets). The parsers are tested on canned output in test_static_sass.py, the model on
hand-made kernels in test_static_model.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvit.benchmarks import static
from fastvit.benchmarks.static_figures import compare, figures_path
from fastvit.benchmarks.static_model import problems
from fastvit.benchmarks.static_triton import KERNEL_MODULES
from fastvit.kernels.aot import ARCHS

ROOT = Path(__file__).resolve().parents[2]
NVCC = static.find_nvcc()


def _session_dir(tmp_path_factory) -> Path:
    """A folder shared by this session's pytest-xdist workers (the README runs ``pytest -n auto``)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report, compiled once per session: the first xdist worker to get here runs it under a
    file lock, the others wait for it and read the same files."""
    shared = _session_dir(tmp_path_factory)
    out, run, figures = shared / "static-report.json", shared / "static-run.json", shared / "static-figures.json"
    with open(shared / "static-report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not run.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks", "static", "--json", str(out), "--figures", str(figures),
                 "--no-table"],
                cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800,
            )  # fmt: skip
            run.write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
    result = json.loads(run.read_text())
    if not out.exists():
        pytest.fail(f"the static report did not finish (exit {result['returncode']}):\n{result['stdout'][-3000:]}\n"
                    f"{result['stderr'][-3000:]}")  # fmt: skip
    return {**json.loads(out.read_text()), "returncode": result["returncode"], "stdout": result["stdout"],
            "figures": json.loads(figures.read_text())}


def _offenders(rows, predicate):
    return [f"sm_{r['arch']} {r['kernel']} [{r['config']}]: {'; '.join(r['problems'])}" for r in rows if predicate(r)]


def test_every_triton_kernel_module_is_covered_for_every_architecture(report):
    seen = {(r["kernel"].split(".")[0], r["arch"]) for r in report["rows"] if r["source"] == "triton"}
    assert seen == {(m, a) for m in KERNEL_MODULES for a in ARCHS}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the csrc kernels cannot be compiled")
def test_every_csrc_kernel_file_is_covered_for_every_architecture(report):
    files = {p.name for p in static.csrc_files()}
    assert files, "no csrc/*_kernels.cu: the extension's kernels are missing"
    seen = {(r["file"], r["arch"]) for r in report["rows"] if r["source"] == "csrc" and "error" not in r}
    assert seen == {(f, a) for f in files for a in ARCHS}
    assert report["meta"]["csrc_skipped"] is None


def test_every_kernel_compiles(report):
    assert not _offenders(report["rows"], lambda r: "error" in r)


def test_no_register_spills(report):
    assert not _offenders(report["rows"], lambda r: any(p.startswith("spills") for p in r["problems"]))


def test_shared_memory_within_architecture_limit(report):
    assert not _offenders(report["rows"], lambda r: "error" not in r and r["shared"] > r["shared_limit"])


def test_fp16_bf16_matmuls_use_warpgroup_mma_on_sm90(report):
    wgmma = [r for r in report["rows"] if r["needs_wgmma"] and r["arch"] == 90]
    assert wgmma, "no fp16/bf16 matmul-bound kernel was compiled for sm_90"
    assert not _offenders(wgmma, lambda r: "error" not in r and r["hgmma"] == 0)
    assert all(r["hmma"] > 0 for r in report["rows"] if r["needs_wgmma"] and r["arch"] == 80 and "error" not in r)


def _committed_figures(report):
    path = figures_path(report["meta"]["triton"])
    if not path.exists():
        pytest.skip(f"no committed figures for Triton {report['meta']['triton']}: create {path} with "
                    f"`python -m benchmarks static --only triton --figures {path}`")  # fmt: skip
    return json.loads(path.read_text())["rows"]


def test_no_new_problems_against_the_committed_figures(report):
    """Every problem of the performance model (replicated MMA rows, narrow hot-loop HGMMA, an
    issue-bound sm_90 hot loop, a config short of its occupancy aim) is one the committed figures
    list; a new one fails."""
    diff = compare(report["figures"]["rows"], _committed_figures(report))
    assert not diff["new_problems"], "\n".join(diff["new_problems"])


def test_figures_match_the_committed_file(report):
    """The committed figures are this code's: after a kernel or config change, regenerate them with
    ``python -m benchmarks static --only triton --figures benchmarks/results/static/figures-triton-<v>.json``
    and commit the diff."""
    diff = compare(report["figures"]["rows"], _committed_figures(report))
    stale = diff["changed"] + [f"added: {k}" for k in diff["added"]] + [f"removed: {k}" for k in diff["removed"]]
    assert not stale, "\n".join(stale[:50])


def test_exit_status_and_summary_agree_with_the_rows(report):
    assert report["returncode"] == (1 if any(r["problems"] for r in report["rows"]) else 0)
    assert report["meta"]["archs"] == list(ARCHS)
    assert report["meta"]["summary"][0] in report["stdout"]


# ---------------------------------------------------------------------------------------------
# the csrc part on a small file of our own: instantiations, names, spills, compile errors
# ---------------------------------------------------------------------------------------------
DEMO = """
#include <cuda_bf16.h>
namespace fastvit { namespace {
template <typename T, int VEC>
__global__ void scale_kernel(T* __restrict__ y, const T* __restrict__ x, float s, int n) {
  __shared__ float tile[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? float(x[i]) : 0.f;
  __syncthreads();
  if (i < n) y[i] = T(tile[255 - threadIdx.x] * s);
}
// a local array indexed at run time lives in local memory: a stack frame, as spills have
__global__ void local_array_kernel(float* y, const int* idx) {
  float a[64];
  for (int j = 0; j < 64; ++j) a[j] = y[j];
  a[idx[0]] += 1.f;
  y[threadIdx.x] = a[idx[threadIdx.x] & 63];
}
}  // namespace
void launch(float* y, const float* x, __nv_bfloat16* yb, const __nv_bfloat16* xb, const int* idx, int n) {
  scale_kernel<float, 4><<<1, 256>>>(y, x, 2.f, n);
  scale_kernel<__nv_bfloat16, 8><<<1, 256>>>(yb, xb, 2.f, n);
  local_array_kernel<<<1, 32>>>(y, idx);
}
}  // namespace fastvit
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_csrc_rows_per_instantiation(tmp_path):
    (tmp_path / "demo_kernels.cu").write_text(DEMO)
    (tmp_path / "broken_kernels.cu").write_text("this is not C++\n")
    rows = static.run_csrc((80,), jobs=2, csrc=tmp_path)
    by_name = {(r["kernel"], r["config"]): r for r in rows}
    assert set(by_name) == {
        ("broken_kernels", ""),
        ("demo_kernels.scale_kernel", "fp32, 4"),
        ("demo_kernels.scale_kernel", "bf16, 8"),
        ("demo_kernels.local_array_kernel", ""),
    }
    broken = by_name["broken_kernels", ""]
    assert "nvcc exit status" in broken["error"] and "does not compile" in problems(broken)[0]
    scale = by_name["demo_kernels.scale_kernel", "bf16, 8"]
    assert scale["shared"] == 1024 and scale["registers"] > 0 and scale["stack"] == 0
    assert problems(scale) == [] and scale["hmma"] == scale["hgmma"] == 0
    assert scale["demangled"].startswith("void fastvit::(anonymous namespace)::scale_kernel<__nv_bfloat16, 8>(")
    local = by_name["demo_kernels.local_array_kernel", ""]
    assert local["stack"] > 0 and problems(local)[0].startswith("spills")


@pytest.mark.parametrize(
    "demangled, expected",
    [
        ("void fastvit::cuda::(anonymous namespace)::ln_fwd_kernel<__nv_bfloat16, float, 1>(__nv_bfloat16 const*)",
         ("ln_fwd_kernel", "bf16, fp32, 1")),
        ("void fastvit::gelu_kernel<__half, (fastvit::Approx)1, true>(__half*, int)",
         ("gelu_kernel", "fp16, Approx 1, true")),
        ("void patchify_kernel(float const*, float*, int)", ("patchify_kernel", "")),
        ("_Z6kernelPf", ("_Z6kernelPf", "")),  # no demangler: the symbol as it is
    ],
)  # fmt: skip
def test_short_names(demangled, expected):
    assert static.short_name(demangled) == expected


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        static.main(["--arch", "80,x"])
    with pytest.raises(SystemExit):
        static.main(["--arch", "70"])
    assert "--arch" in capsys.readouterr().err


def test_a_match_run_refuses_a_figures_file_of_another_triton(tmp_path, capsys):
    # static --match X --figures FILE over the reviewed figures of another Triton replaced the file's
    # 1060 rows with the matching ones alone (0 for a match of nothing), exit 0
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"meta": {"triton": "0.0.1"}, "rows": {"sm_90 k [c]": {"problems": []}}}))
    with pytest.raises(SystemExit):
        static.main(["--match", "NO_SUCH_KERNEL", "--figures", str(figures)])
    assert "holds the figures of Triton 0.0.1" in capsys.readouterr().err
    assert json.loads(figures.read_text())["rows"] == {"sm_90 k [c]": {"problems": []}}


def test_a_match_of_nothing_is_said(capsys):
    # an empty table and exit 0 before
    assert static.main(["--match", "NO_SUCH_KERNEL_CONFIGURATION", "--arch", "90", "--no-table"]) == 2
    assert "no kernel configuration contains it" in capsys.readouterr().err
