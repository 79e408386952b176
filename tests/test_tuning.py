"""fastvit.tuning (the measured table ``auto`` follows) and the backend choice it drives."""

from __future__ import annotations

import importlib
import json
import os
import time
import warnings

import pytest
import torch

import fastvit
from fastvit import extension, tuning

backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is also the function
GPU = torch.device("cuda")  # only handed to the (patched) lookups below, never used for memory


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("FASTVIT_TUNE_TABLE", str(path))
    monkeypatch.setattr(tuning, "device_name", lambda device: "Test GPU" if device.type == "cuda" else "cpu")
    return path


def test_buckets_round_rows_up_to_powers_of_two():
    assert tuning.layernorm_mlp_bucket(768, 3072, torch.bfloat16, 50432, True) == (
        "D=768,hidden=3072,bfloat16,rows<=65536,train"
    )
    assert tuning.layernorm_mlp_bucket(768, 3072, torch.bfloat16, 65536, False).endswith("rows<=65536,infer")
    assert tuning.layernorm_mlp_bucket(768, 3072, torch.bfloat16, 65537, False).endswith("rows<=131072,infer")
    assert tuning.layernorm_mlp_bucket(384, 1536, torch.float16, 1, False).endswith("rows<=1,infer")
    assert tuning.patch_embed_bucket(3, 16, 768, torch.float32, 196 * 8, True) == (
        "C=3,p=16,D=768,float32,rows<=2048,train"
    )


def test_record_keeps_the_timings_and_returns_the_faster(table):
    assert tuning.lookup("Test GPU", "layernorm_mlp", "k1") is None
    assert tuning.record("Test GPU", "layernorm_mlp", "k1", {"triton": 2.0, "cuda": 1.5}, shape="s") == "cuda"
    assert tuning.record("Test GPU", "layernorm_mlp", "k2", {"triton": 1.0, "cuda": 1.5}) == "triton"
    assert tuning.record("Other GPU", "patch_embed", "k1", {"triton": 3.0, "cuda": 1.0}) == "cuda"
    data = json.loads(table.read_text())
    entry = data["entries"]["Test GPU"]["layernorm_mlp"]["k1"]
    assert entry["backend"] == "cuda" and entry["ms"] == {"triton": 2.0, "cuda": 1.5} and entry["shape"] == "s"
    assert tuning.lookup("Test GPU", "layernorm_mlp", "k1") == "cuda"
    assert tuning.lookup("Test GPU", "layernorm_mlp", "k2") == "triton"
    assert tuning.lookup("Test GPU", "patch_embed", "k1") is None  # another device's entry
    # re-measuring a bucket replaces its entry
    tuning.record("Test GPU", "layernorm_mlp", "k1", {"triton": 1.0, "cuda": 1.5})
    assert tuning.lookup("Test GPU", "layernorm_mlp", "k1") == "triton"


def test_record_refuses_an_empty_measurement(table):
    with pytest.raises(ValueError, match="no usable timing"):
        tuning.record("Test GPU", "layernorm_mlp", "k", {"triton": float("nan")})


def test_a_broken_table_is_ignored_with_a_warning(table):
    table.write_text("{not json")
    with pytest.warns(fastvit.FastvitFallbackWarning, match="ignoring the tuning table"):
        assert tuning.lookup("Test GPU", "layernorm_mlp", "k") is None


def _pretend_extension(monkeypatch, cuda_kernels=True):
    monkeypatch.setattr(extension, "load", lambda build=None: True)
    monkeypatch.setattr(extension, "has_cuda_kernels", lambda: cuda_kernels)


def test_auto_follows_the_table_on_a_gpu_and_defaults_to_triton(table, monkeypatch):
    _pretend_extension(monkeypatch)
    key = tuning.layernorm_mlp_bucket(768, 3072, torch.bfloat16, 50432, True)
    assert backend_module.resolve_backend(GPU, "layernorm_mlp", lambda: key) == "triton"  # no entry
    tuning.record("Test GPU", "layernorm_mlp", key, {"triton": 2.0, "cuda": 1.0})
    assert backend_module.resolve_backend(GPU, "layernorm_mlp", lambda: key) == "cuda"
    # other buckets, other ops and the CPU are untouched by the entry
    other = tuning.layernorm_mlp_bucket(768, 3072, torch.bfloat16, 50432, False)
    assert backend_module.resolve_backend(GPU, "layernorm_mlp", lambda: other) == "triton"
    assert backend_module.resolve_backend(GPU, "flash_attention", lambda: key) == "triton"
    assert backend_module.resolve_backend(torch.device("cpu"), "layernorm_mlp", lambda: key) == "torch"
    # an explicit choice wins over the table
    with fastvit.backend("triton"):
        assert backend_module.resolve_backend(GPU, "layernorm_mlp", lambda: key) == "triton"


def test_auto_runs_pytorch_where_pytorch_measured_faster(table, monkeypatch):
    """issue 15: auto is never slower than PyTorch on a measured bucket, for every op."""
    _pretend_extension(monkeypatch)
    mlp = tuning.layernorm_mlp_bucket(384, 1536, torch.bfloat16, 197, False)
    attention = tuning.attention_bucket(64, torch.bfloat16, 197, 12, False, False, False)
    assert attention == "D=64,bfloat16,BH<=16,full,dense,rows<=256,infer"
    tuning.record("Test GPU", "layernorm_mlp", mlp, {"triton": 2.0, "cuda": 1.5, "torch": 1.0})
    tuning.record("Test GPU", "flash_attention", attention, {"triton": 0.5, "torch": 0.4})
    assert backend_module.resolve_backend(GPU, "layernorm_mlp", lambda: mlp) == "torch"
    assert backend_module.resolve_backend(GPU, "flash_attention", lambda: attention) == "torch"
    tuning.record("Test GPU", "flash_attention", attention, {"triton": 0.3, "torch": 0.4})
    assert backend_module.resolve_backend(GPU, "flash_attention", lambda: attention) == "triton"
    # a table naming cuda for an op the extension does not cover runs Triton
    tuning.record("Test GPU", "flash_attention", attention, {"triton": 0.3, "cuda": 0.1, "torch": 0.4})
    assert backend_module.resolve_backend(GPU, "flash_attention", lambda: attention) == "triton"


def test_flash_attention_consults_the_table_with_its_bucket(table, monkeypatch):
    seen = []
    real = backend_module.resolve_backend

    def spy(device, op=None, bucket=None):
        seen.append((op, bucket() if bucket is not None else None))
        return real(device, op, bucket)

    monkeypatch.setattr("fastvit.ops.flash_attention.resolve_backend", spy)
    q = torch.randn(2, 3, 5, 8)
    fastvit.flash_attention(q, q, q, causal=True)
    assert seen == [("flash_attention", "D=8,float32,BH<=8,causal,dense,rows<=8,infer")]


def test_auto_falls_back_to_triton_when_the_table_names_a_missing_extension(table, monkeypatch):
    monkeypatch.setattr(extension, "load", lambda build=None: False)
    monkeypatch.setattr(extension, "unavailable_reason", lambda: "not built")
    monkeypatch.setattr(backend_module, "_warned", set())
    tuning.record("Test GPU", "patch_embed", "k", {"triton": 2.0, "cuda": 1.0})
    with pytest.warns(fastvit.FastvitFallbackWarning, match="not built"):
        assert backend_module.resolve_backend(GPU, "patch_embed", lambda: "k") == "triton"


def test_the_bucket_is_built_only_when_auto_consults_the_table(table, monkeypatch):
    def explode() -> str:
        raise AssertionError("bucket built")

    assert backend_module.resolve_backend(torch.device("cpu"), "layernorm_mlp", explode) == "torch"
    with fastvit.backend("torch"):
        assert backend_module.resolve_backend(GPU, "layernorm_mlp", explode) == "torch"


def test_cuda_backend_on_a_gpu_needs_the_cuda_kernels(monkeypatch):
    _pretend_extension(monkeypatch, cuda_kernels=False)
    with fastvit.backend("cuda"), pytest.raises(RuntimeError, match="without its CUDA kernels"):
        backend_module.resolve_backend(GPU, "layernorm_mlp")


def test_backend_names(monkeypatch):
    assert "cuda" in fastvit.backend.__doc__ or "cuda" in backend_module.BACKENDS
    monkeypatch.setenv("FASTVIT_BACKEND", "CUDA")
    assert fastvit.current_backend() == "cuda"
    with pytest.raises(ValueError, match="must be one of"), fastvit.backend("cudnn"):
        pass


def test_patch_on_a_gpu_without_a_table_says_how_to_make_one(table, monkeypatch):
    from fastvit.patching import api
    from tests.patching.helpers import timm_vit

    pytest.importorskip("timm")
    monkeypatch.setattr(backend_module, "_warned", set())
    monkeypatch.setattr(api, "_gpu_of", lambda model: GPU)  # as if the model were on a GPU
    with pytest.warns(fastvit.FastvitFallbackWarning, match="python -m benchmarks tune"):
        fastvit.patch(timm_vit())
    tuning.record("Test GPU", "layernorm_mlp", "k", {"triton": 1.0, "torch": 2.0})
    monkeypatch.setattr(backend_module, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)
        fastvit.patch(timm_vit())  # a table exists: nothing to say
    monkeypatch.setattr(api, "_gpu_of", lambda model: None)
    monkeypatch.setattr(backend_module, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)
        tuning.table_path().unlink()
        fastvit.patch(timm_vit())  # on a CPU: nothing to say


def test_the_tuning_hint_as_an_error_leaves_the_model_unpatched(table, monkeypatch):
    # with warnings as errors (pytest -W error) the hint raised after the swaps: the model stayed
    # patched, its Hugging Face configs not routed, no report returned
    from fastvit.patching import api
    from tests.patching.helpers import timm_vit

    pytest.importorskip("timm")
    monkeypatch.setattr(backend_module, "_warned", set())
    monkeypatch.setattr(api, "_gpu_of", lambda model: GPU)
    model = timm_vit()
    before = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)
        with pytest.raises(fastvit.FastvitFallbackWarning, match="no tuning table"):
            fastvit.patch(model)
    assert [type(m) for m in model.modules()] == before


def test_lookup_looks_at_the_file_once_per_recheck_interval(table, monkeypatch):
    """auto asks the table on every GPU op call: no stat per call (slow on sandboxed hosts), and a
    table another process replaced is still seen once RECHECK_S has passed."""
    tuning.record("Test GPU", "layernorm_mlp", "k", {"triton": 2.0, "cuda": 1.5})
    stats = []
    real_stat = type(table).stat

    def counting_stat(self, *args, **kwargs):
        stats.append(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(type(table), "stat", counting_stat)
    monkeypatch.setattr(tuning, "RECHECK_S", 3600.0)
    for _ in range(100):
        assert tuning.lookup("Test GPU", "layernorm_mlp", "k") == "cuda"
    assert len(stats) <= 1
    # another process replaces the table: seen after the interval (0 here)
    data = json.loads(table.read_text())
    data["entries"]["Test GPU"]["layernorm_mlp"]["k"]["backend"] = "triton"
    table.write_text(json.dumps(data))
    os.utime(table, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new mtime, whatever the clock
    monkeypatch.setattr(tuning, "RECHECK_S", 0.0)
    assert tuning.lookup("Test GPU", "layernorm_mlp", "k") == "triton"


def test_lookup_is_a_constant_under_torch_compile(table):
    """Under fullgraph torch.compile on a GPU, ``auto`` reads the table (a file, its mtime and the
    GPU's name: none traceable) once while tracing; it was a graph break (H200, torch 2.11)."""
    key = tuning.attention_bucket(64, torch.bfloat16, 197, 12, False, False, False)
    tuning.record("Test GPU", "flash_attention", key, {"triton": 0.5, "torch": 0.4})

    def route_dependent(x):
        return x * 2 if tuning.lookup(GPU, "flash_attention", key) == "torch" else x * 3

    torch._dynamo.reset()
    x = torch.ones(3)
    torch.testing.assert_close(torch.compile(route_dependent, fullgraph=True, backend="eager")(x), x * 2)


class _TracedRoute(torch.nn.Module):
    """Builds the three ops' buckets from its input's sizes and picks attention's route on the
    pretend GPU, as the ops do under ``auto``: x * 2 where the table names PyTorch, else x * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, rows = x.shape[1], x.shape[0] * x.shape[1]
        tuning.layernorm_mlp_bucket(8, 32, x.dtype, rows, False)
        tuning.patch_embed_bucket(3, 16, 8, x.dtype, rows, False)
        key = tuning.attention_bucket(64, torch.bfloat16, tokens, x.shape[0] * 4, False, False, False)
        route = backend_module.resolve_backend(GPU, "flash_attention", lambda: key)
        return x * 2 if route == "torch" else x * 3


@pytest.mark.parametrize("strict", [False, True], ids=["export", "export-strict"])
def test_buckets_built_while_exporting_leave_dynamic_sizes_dynamic(table, strict):
    """Reading a traced size (int(rows) for its power-of-two bucket) specialized the graph to it:
    torch.export with a dynamic batch or token count raised "Constraints violated" on a GPU under
    ``auto``, for every patched model. While tracing the buckets' sizes are any (``<=*``)."""
    from torch.export import Dim

    x = torch.randn(4, 197, 8)
    exported = torch.export.export(
        _TracedRoute(), (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("tokens")},), strict=strict
    )
    y = torch.randn(3, 50, 8)
    torch.testing.assert_close(exported.module()(y), y * 3)  # no entry: Triton


def test_buckets_built_under_dynamic_compile_do_not_recompile_per_size(table):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(_TracedRoute(), fullgraph=True, backend=counting_backend, dynamic=True)
    for batch, tokens in ((4, 197), (5, 100), (6, 577)):
        x = torch.randn(batch, tokens, 8)
        torch.testing.assert_close(compiled(x), x * 3)
    assert len(graphs) == 1  # it was one graph per size: each one specialized to its rows' bucket


def test_a_traced_bucket_follows_the_fastest_over_every_measured_size(table):
    def key(tokens: int, batch_heads: int, causal: bool = False) -> str:
        return tuning.attention_bucket(64, torch.bfloat16, tokens, batch_heads, causal, False, False)

    # PyTorch wins the small bucket, Triton the large one by more: Triton is faster in total
    tuning.record("Test GPU", "flash_attention", key(197, 48), {"triton": 2.0, "torch": 1.0})
    tuning.record("Test GPU", "flash_attention", key(4096, 48), {"triton": 5.0, "torch": 10.0})
    # other fields (causal) and backends not timed in every bucket do not count
    tuning.record("Test GPU", "flash_attention", key(197, 48, causal=True), {"triton": 99.0, "torch": 0.1})
    tuning.record("Test GPU", "flash_attention", key(1024, 16), {"triton": 1.0, "torch": 1.0, "cuda": 0.001})
    traced = "D=64,bfloat16,BH<=*,full,dense,rows<=*,infer"
    assert tuning.lookup("Test GPU", "flash_attention", traced) == "triton"
    tuning.record("Test GPU", "flash_attention", key(50, 8), {"triton": 9.0, "torch": 1.0})
    assert tuning.lookup("Test GPU", "flash_attention", traced) == "torch"  # 17 vs 13 ms
    assert tuning.lookup("Test GPU", "flash_attention", traced.replace("D=64", "D=80")) is None  # nothing measured
    assert tuning.lookup("Test GPU", "flash_attention", key(197, 48)) == "torch"  # exact buckets as before
    assert tuning.size_field("rows", 197) == "rows<=256"  # outside tracing: a power of two
    assert tuning.size_field("rows", torch.tensor(197)) == "rows<=256"  # a size as torch.jit.trace records it


def test_a_static_compile_reads_its_exact_bucket(table):
    """Static sizes of a traced graph are read as in eager (no guard to add): the exact bucket."""
    small = tuning.attention_bucket(64, torch.bfloat16, 197, 16, False, False, False)
    tuning.record("Test GPU", "flash_attention", small, {"triton": 2.0, "torch": 1.0})
    large = tuning.attention_bucket(64, torch.bfloat16, 4096, 16, False, False, False)
    tuning.record("Test GPU", "flash_attention", large, {"triton": 5.0, "torch": 10.0})
    torch._dynamo.reset()
    compiled = torch.compile(_TracedRoute(), fullgraph=True, backend="eager", dynamic=False)
    x = torch.randn(4, 197, 8)  # BH = 16, 197 tokens: PyTorch measured faster
    torch.testing.assert_close(compiled(x), x * 2)
    torch._dynamo.reset()
    dynamic = torch.compile(_TracedRoute(), fullgraph=True, backend="eager", dynamic=True)
    torch.testing.assert_close(dynamic(x), x * 3)  # dynamic: Triton is faster over both sizes (7 vs 11 ms)
