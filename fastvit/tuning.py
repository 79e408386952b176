"""The measured choice between the ``triton``, ``cuda`` and ``torch`` routes that ``auto`` follows.

``python -m benchmarks tune`` times the routes per (device, op, shape bucket): fastvit's Triton
kernels, the ``cuda`` backend where the op has one, and PyTorch's own route (SDPA with its best
backend for attention, the eager composite for the LayerNorm+MLP, Conv2d + flatten + cat + add
for the patch embedding), and records the fastest here, in ``<cache>/tune.json``
(``fastvit.cache.cache_dir()``). ``auto`` looks the call's bucket up, so where PyTorch measured
faster it runs PyTorch: ``auto`` is never slower than PyTorch on a measured bucket. It runs Triton
wherever the table has no entry: nothing in it is a guess, each entry keeps the timings it was
chosen from.

A bucket names the shape features that decide which backend is faster: the op's widths, the GEMM
dtype, the token rows rounded up to a power of two, and whether a backward will follow (``train``)
or not (``infer``), e.g. ``"D=768,hidden=3072,bfloat16,rows<=65536,train"``. For attention the
rows are the query tokens per sequence, beside the (batch x heads) bucket and the causal / masked
flags: ``"D=64,bfloat16,BH<=64,full,dense,rows<=256,infer"``. A dynamic size of a graph that
torch.compile or torch.export traces is not read: its field is ``<=*`` and ``auto`` follows the
backend fastest over all the measured sizes of the other fields together.

File layout::

    {"version": 1,
     "entries": {"<device name>": {"<op>": {"<bucket>": {
         "backend": "cuda", "ms": {"triton": 1.93, "cuda": 1.71, "torch": 2.40},
         "shape": "...", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-11-25"}}}}}
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import has_static_value

from fastvit.cache import cache_dir

__all__ = [
    "TUNABLE_BACKENDS",
    "attention_bucket",
    "bucket",
    "device_name",
    "has_table",
    "layernorm_mlp_bucket",
    "load_table",
    "lookup",
    "patch_embed_bucket",
    "record",
    "size_field",
    "table_path",
]

VERSION = 1
TUNABLE_BACKENDS = ("triton", "cuda", "torch")

_lock = threading.Lock()
_cache: dict[str, Any] = {"path": None, "mtime": None, "table": None, "checked": float("-inf")}
# seconds between two looks at the table file's mtime (a changed table is read within this time)
RECHECK_S = 1.0


def table_path() -> Path:
    """``<cache>/tune.json``; ``FASTVIT_TUNE_TABLE`` names another file. Resolved once per value of
    the environment variables it reads (``auto`` asks on every op call on a GPU)."""
    env = os.environ
    return _table_path(env.get("FASTVIT_TUNE_TABLE"), env.get("FASTVIT_CACHE_DIR"), env.get("XDG_CACHE_HOME"))


@functools.lru_cache(maxsize=8)
def _table_path(explicit: str | None, cache: str | None, xdg: str | None) -> Path:
    return Path(explicit).expanduser() if explicit else cache_dir() / "tune.json"


def device_name(device: torch.device) -> str:
    """The table's device key: the GPU's marketing name (``"NVIDIA H100 80GB HBM3"``), or ``"cpu"``."""
    if device.type == "cuda":
        return _cuda_device_name(torch.cuda.current_device() if device.index is None else device.index)
    return device.type


@functools.lru_cache(maxsize=64)
def _cuda_device_name(index: int) -> str:
    # asked on every GPU op call under ``auto``: the name is read from the driver once per device
    return torch.cuda.get_device_name(index)


# the size field of a traced graph's dynamic size (see ``size_field``)
_ANY_SIZE = "*"


def size_field(name: str, size: int) -> str:
    """A bucket's size field: ``size`` rounded up to a power of two (``"rows<=256"``); ``"rows<=*"``
    for a dynamic size of a graph torch.compile or torch.export traces, where reading it
    (``int(size)``) would specialize the graph to it: a recompile at every new batch or image size,
    and a "Constraints violated" error from torch.export with a dynamic dimension. ``lookup`` reads
    such a bucket over every measured size. Static sizes of a traced graph are read as in eager.

    Example:
        >>> size_field("rows", 197)
        'rows<=256'
    """
    if not isinstance(size, torch.Tensor) and not has_static_value(size):  # (torch.jit.trace's sizes are tensors)
        return f"{name}<={_ANY_SIZE}"
    return f"{name}<={1 << max(0, int(size) - 1).bit_length()}"


def bucket(*features: object, rows: int, train: bool) -> str:
    """A bucket key: the given features, the rows rounded up to a power of two, train or infer.

    Example:
        >>> bucket("D=768", "hidden=3072", "bfloat16", rows=50432, train=True)
        'D=768,hidden=3072,bfloat16,rows<=65536,train'
    """
    return ",".join([*(str(f) for f in features), size_field("rows", rows), "train" if train else "infer"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layernorm_mlp_bucket(dim: int, hidden: int, dtype: torch.dtype, rows: int, train: bool) -> str:
    """The bucket of a ``layernorm_mlp`` call: width, hidden size, GEMM dtype, token rows, mode."""
    return bucket(f"D={dim}", f"hidden={hidden}", _dtype_name(dtype), rows=rows, train=train)


def patch_embed_bucket(channels: int, patch: int, dim: int, dtype: torch.dtype, rows: int, train: bool) -> str:
    """The bucket of a ``patch_embed`` call: channels, patch size, width, GEMM dtype, patch rows, mode."""
    return bucket(f"C={channels}", f"p={patch}", f"D={dim}", _dtype_name(dtype), rows=rows, train=train)


def attention_bucket(
    head_dim: int, dtype: torch.dtype, tokens: int, batch_heads: int, causal: bool, masked: bool, train: bool
) -> str:
    """The bucket of a ``flash_attention`` call: head dim, dtype, (B x H) rounded up to a power of
    two, causal or full, masked (attn_mask / rel_pos) or dense, query tokens per sequence, mode.

    Example:
        >>> attention_bucket(64, torch.bfloat16, 197, 48, False, False, False)
        'D=64,bfloat16,BH<=64,full,dense,rows<=256,infer'
    """
    return bucket(
        f"D={head_dim}", _dtype_name(dtype), size_field("BH", batch_heads), "causal" if causal else "full",
        "masked" if masked else "dense", rows=tokens, train=train,
    )  # fmt: skip


def has_table(device: torch.device | str) -> bool:
    """Whether the table holds any measurement for ``device`` (``fastvit.patch`` says how to make one
    when it does not)."""
    name = device if isinstance(device, str) else device_name(device)
    return bool(load_table()["entries"].get(name))


def load_table(path: Path | None = None) -> dict[str, Any]:
    """The table at ``path`` (default ``table_path()``): re-read when the file changes (its mtime is
    looked at again at most every ``RECHECK_S`` seconds; ``record`` re-reads at once), empty when
    there is none. A file that is not a table of this version is ignored (and says why once).
    Not traceable by torch.compile: ``lookup``, which reads it, is a constant there."""
    path = table_path() if path is None else path
    now = time.monotonic()
    if _cache["path"] == path and now - _cache["checked"] < RECHECK_S:
        # auto asks on every GPU op call: the file is looked at again at most every RECHECK_S
        # (a stat per call cost ~10+ us on the sandboxed H200 host)
        return _cache["table"]
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {"version": VERSION, "entries": {}}
    with _lock:
        if _cache["path"] == path and _cache["mtime"] == mtime:
            _cache["checked"] = now
            return _cache["table"]
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict) or table.get("version") != VERSION or not isinstance(
                table.get("entries"), dict
            ):
                raise ValueError(f"not a version-{VERSION} fastvit tuning table")
        except (OSError, ValueError) as err:
            from fastvit.backend import warn_once

            warn_once(f"tune-table:{path}", f"fastvit: ignoring the tuning table {path}: {err}")
            table = {"version": VERSION, "entries": {}}
        _cache.update(path=path, mtime=mtime, table=table, checked=now)
        return table


@torch.compiler.assume_constant_result
def lookup(device: torch.device | str, op: str, key: str) -> str | None:
    """The measured faster backend for ``op`` at bucket ``key`` on ``device``, or None (no entry).

    Under ``torch.compile`` the answer is read once, when the graph is traced, and kept in it as a
    constant (the table file, its mtime and the GPU's name are not traceable, and a route chosen
    per call would be a graph break under ``fullgraph=True``). A bucket of a traced graph's dynamic
    sizes has any-size fields (``size_field``): its answer is the backend fastest over every
    measured size.

    Example:
        >>> lookup(torch.device("cuda"), "layernorm_mlp", layernorm_mlp_bucket(768, 3072, torch.bfloat16, 50432, True))
        'cuda'
    """
    name = device if isinstance(device, str) else device_name(device)
    entries = load_table()["entries"].get(name, {}).get(op, {})
    if f"<={_ANY_SIZE}" in key:
        return _fastest_over_sizes(entries, key)
    entry = entries.get(key)
    if not isinstance(entry, dict):
        return None
    choice = entry.get("backend")
    return choice if choice in TUNABLE_BACKENDS else None


def _fastest_over_sizes(entries: dict[str, Any], key: str) -> str | None:
    """For a bucket traced with ``size_field``'s any-size fields: the backend with the least total
    time over every measured bucket that matches it (its other fields equal), among the backends
    timed in all of them; None where nothing matches."""
    fields = key.split(",")
    totals: dict[str, float] | None = None
    for other, entry in entries.items():
        other_fields = other.split(",")
        if not isinstance(entry, dict) or len(other_fields) != len(fields):
            continue
        if not all(
            mine == theirs or (mine.endswith(f"<={_ANY_SIZE}") and theirs.startswith(mine[: -len(_ANY_SIZE)]))
            for mine, theirs in zip(fields, other_fields, strict=True)
        ):
            continue
        timed = entry.get("ms")
        ms = {b: t for b, t in timed.items() if b in TUNABLE_BACKENDS} if isinstance(timed, dict) else {}
        totals = ms if totals is None else {b: totals[b] + ms[b] for b in totals if b in ms}
    if not totals:
        return None
    return min(totals, key=totals.__getitem__)


def record(device: str, op: str, key: str, ms: dict[str, float], *, shape: str = "", path: Path | None = None) -> str:
    """Store the measured times ``ms`` (backend -> milliseconds) of one bucket and return the
    faster backend; the file is replaced atomically, other entries are kept."""
    timed = {b: float(t) for b, t in ms.items() if b in TUNABLE_BACKENDS and t == t and t > 0}
    if not timed:
        raise ValueError(f"no usable timing among {ms!r} (backends {TUNABLE_BACKENDS})")
    winner = min(timed, key=timed.__getitem__)
    path = table_path() if path is None else path
    _cache["checked"] = float("-inf")  # read the file as it is now (another process may have written)
    table = json.loads(json.dumps(load_table(path)))  # a private copy
    import datetime

    import triton

    table["entries"].setdefault(device, {}).setdefault(op, {})[key] = {
        "backend": winner,
        "ms": {b: round(t, 5) for b, t in timed.items()},
        "shape": shape,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _cache["checked"] = float("-inf")  # the next lookup sees this entry
    return winner
