"""The extension build under concurrency: several processes (pytest-xdist workers) that call
``fastvit.extension.load(build=True)`` on one empty cache build it once and all load it; a killed
builder never leaves a lock that blocks the next one, nor a broken library that blocks loading.

Runs the CPU-only build (three translation units) in a temporary cache folder, in subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastvit import extension

REPO = Path(__file__).resolve().parents[2]

_BUILD_AND_CALL = textwrap.dedent(
    """
    import sys
    import torch
    import fastvit.extension as ext
    ext.cuda_home = lambda: None  # the CPU-only build: the same locking, a third of the compile time
    ok = ext.load(build=True)
    if not ok:
        sys.exit("load failed: " + str(ext.unavailable_reason()))
    y, _, _ = torch.ops.fastvit_C.layer_norm_fwd(torch.randn(3, 8), None, None, 1e-6, torch.float32)
    print("ok", float(y.sum()))
    """
)


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, FASTVIT_CACHE_DIR=str(cache), MAX_JOBS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_concurrent_builds_compile_once_and_all_load(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD_AND_CALL], env=_env(tmp_path), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "ok" in out
    (build_dir,) = (tmp_path / "extension").iterdir()
    assert build_dir.name.split("-")[-2] == "cpu"
    log = (build_dir / ".ninja_log").read_text().splitlines()[1:]
    compiled = [line.split("\t")[3] for line in log]  # start, end, mtime, output, command hash
    # each object compiled once: the waiters found the finished library and loaded it
    assert sorted(compiled) == sorted(set(compiled)), compiled
    assert compiled.count("ops.o") == compiled.count("cpu_loops.o") == 1

    # a cached library that does not load (a link killed half-way) is relinked, not reported forever
    library = extension._library_path(build_dir)
    library.write_bytes(library.read_bytes()[:4096])  # dlopen of this would die of SIGBUS
    out = subprocess.run([sys.executable, "-c", _BUILD_AND_CALL], env=_env(tmp_path), cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]
    relinked = [line.split("\t")[3] for line in (build_dir / ".ninja_log").read_text().splitlines()[1:]]
    assert relinked[len(compiled):] == [library.name]  # only the link step ran again


_HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import fastvit.extension as ext
    with ext._build_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
    """
)

_TAKE_LOCK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import fastvit.extension as ext
    with ext._build_lock(Path(sys.argv[1])):
        print("acquired", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks")
def test_a_killed_builder_releases_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], env=_env(tmp_path), cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "lock").write_text("")  # what an old torch's FileBaton leaves behind when killed
        waiter = subprocess.Popen([sys.executable, "-c", _TAKE_LOCK, str(tmp_path)], env=_env(tmp_path), cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiter.poll() is None, "the second process got the lock while the first held it"
        holder.send_signal(signal.SIGKILL)  # a build killed mid-way (OOM, timeout)
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 0 and out.strip() == "acquired"
        assert not (tmp_path / "lock").exists()  # the stale FileBaton file was cleared under the real lock
    finally:
        holder.kill()
        holder.wait()


def test_unavailable_reason_names_the_missing_compiler(tmp_path):
    script = textwrap.dedent(
        """
        import importlib.util
        import fastvit.extension as ext
        if importlib.util.find_spec("fastvit._C") is not None:
            print("ahead-of-time build installed")
            raise SystemExit(0)
        assert ext.load(build=True) is False
        print(ext.unavailable_reason())
        assert ext.available() is False and not ext.has_cuda_kernels()
        """
    )
    env = dict(_env(tmp_path), CXX="no-such-compiler-fastvit")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("ahead-of-time"):
        pytest.skip("an ahead-of-time fastvit._C build is installed: nothing to compile")
    assert out.stdout.startswith("no C++ compiler: 'no-such-compiler-fastvit'"), out.stdout
    assert extension.sources(cuda=False)  # the sources were there: the compiler is what is missing
