"""The attention, mlp and model suites end to end on tiny sizes, in process (workers still fork)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from fastvit.benchmarks import attention, cli, mlp, model
from fastvit.benchmarks.progress import Progress
from fastvit.benchmarks.records import Point
from fastvit.benchmarks.report import SLOPE_HEADER, slope_rows

SEQ_LENS = [17, 26]  # 1 cls token + 4x4, 5x5 grids


def args(**overrides):
    base = dict(
        device="cpu",
        dtype="float32",
        mode="both",
        seq_lens=None,
        batch=1,
        heads=2,
        head_dim=16,
        quick=True,
        budget=10.0,
        threads=1,
        impls=None,
        model=None,
        resolutions=None,
        deadline=None,
    )
    return SimpleNamespace(**{**base, **overrides})


def point_of(r):
    params = {k: r.extra[k] for k in ("grid", "num_prefix_tokens", "window") if k in r.extra}
    return Point(r.suite, r.impl, r.mode, r.n_tokens, r.batch, r.heads, r.head_dim, r.dtype, r.device, params)


def test_eager_attention_is_softmax_attention():
    from fastvit import reference

    q, k, v = torch.randn(3, 2, 3, 19, 16, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(attention.eager_attention(q, k, v), reference.attention(q, k, v)[0])


def test_attention_suite_rows():
    impls = ["eager", "axial", "sdpa[efficient]", "fastvit", "flash-attn"]  # the smoke test runs them all
    records = attention.run(args(seq_lens=SEQ_LENS, impls=impls), Progress(enabled=False))
    assert len(records) == len(impls) * 2 * len(SEQ_LENS)
    by_impl = {}
    for r in records:
        by_impl.setdefault(r.impl, []).append(r)
    for impl in ("eager", "axial", "fastvit[torch]"):  # fastvit: labelled with the route that ran
        rows = by_impl[impl]
        assert [r.status for r in rows] == ["ok"] * 4, [(r.status, r.note) for r in rows]
        assert [(r.mode, r.n_tokens) for r in rows] == [(m, n) for m in ("fwd", "fwd+bwd") for n in SEQ_LENS]
        for r in rows:
            assert r.ms > 0 and r.peak_mem_bytes is not None
            assert r.tflops == pytest.approx(attention.flops(point_of(r)) / (r.ms * 1e-3) / 1e12)
    assert [r.extra["grid"] for r in by_impl["axial"][:2]] == ["4x4", "5x5"]
    # no CPU kernel for the memory-efficient backend; flash-attn is not installed here
    assert {r.status for r in by_impl["sdpa[efficient]"]} == {"unavailable"}
    assert all(r.note for r in by_impl["sdpa[efficient]"])
    assert {r.status for r in by_impl["flash-attn"]} == {"unavailable"}
    assert "not installed" in by_impl["flash-attn"][0].note


def test_mlp_suite_variant_rows():
    """The mlp suite's variants: by default the ViT widths (GELU) and EVA02-B's gated MLP with its
    hidden norm beside them (not under --quick or picked widths); the variant's eager function and
    fastvit's call agree, its workload runs a training step, and its FLOPs count three projections."""
    full = [(p.params["model"], p.params["variant"], p.params["hidden"])
            for p in mlp.points(args(quick=False, heads=None, head_dim=None, mode="fwd"), "eager")]
    assert ("eva02_b", "swiglu_hidden_norm", 2048) in full and ("vit_b", "gelu", 3072) in full
    assert {p.params["variant"] for p in mlp.points(args(quick=True), "eager")} == {"gelu"}
    point = Point("mlp", "eager", "fwd+bwd", 9, 2, 2, 8, "float32", "cpu",
                  {"model": "eva02_b", "dim": 16, "hidden": 24, "variant": "swiglu_hidden_norm"})
    torch.manual_seed(0)
    shapes = ((16,), (16,), (24, 16), (24,), (16, 24), (16,), (24, 16), (24,), (24,), (24,))
    tensors = [torch.randn(2, 9, 16), *(torch.randn(*shape) for shape in shapes)]
    fused, label = mlp._implementation(dataclasses.replace(point, impl="fastvit"))
    assert label == "fastvit[torch]"
    torch.testing.assert_close(fused(*tensors), mlp.eager_swiglu_hidden_norm(*tensors))
    mlp.build(point).step(0)
    assert mlp.flops(point) == 3 * 6.0 * 18 * 16 * 24
    old = Point("mlp", "eager", "fwd", 9, 2, 2, 8, "float32", "cpu", {"dim": 16, "hidden": 24})
    assert mlp.flops(old) == 4.0 * 18 * 16 * 24  # a record written before the variants: GELU


def test_attention_flops():
    dense = Point("attention", "eager", "fwd", 197, 2, 12, 64, "float32", "cpu")
    assert attention.flops(dense) == 4 * 2 * 12 * 197 * 197 * 64
    both = Point("attention", "eager", "fwd+bwd", 197, 2, 12, 64, "float32", "cpu")
    assert attention.flops(both) == 3.5 * attention.flops(dense)
    axial = Point(
        "attention", "axial", "fwd", 197, 1, 1, 1, "float32", "cpu", {"grid": "14x14", "num_prefix_tokens": 1}
    )
    # 196 grid queries see 14 + 1 keys per axis; the cls query sees all 197
    assert attention.flops(axial) == 4 * (196 * 2 * 15 + 197)


def test_window_flops_count_padded_windows_and_prefix():
    # 14 x 14 grid in 14 x 14 windows: one window of 196 queries over 1 + 196 keys; the cls query sees 197
    window = Point("attention", "window", "fwd", 197, 1, 1, 1, "float32", "cpu",
                   {"grid": "14x14", "num_prefix_tokens": 1, "window": 14})  # fmt: skip
    assert attention.flops(window) == 4 * (196 * 197 + 197)
    # 15 x 15 grid: padded to 2 x 2 windows of 14 x 14
    window = Point("attention", "window", "fwd+bwd", 226, 2, 3, 4, "float32", "cpu",
                   {"grid": "15x15", "num_prefix_tokens": 1, "window": 14})  # fmt: skip
    assert attention.flops(window) == 3.5 * 4 * 2 * 3 * 4 * (4 * 196 * 197 + 226)


def test_biased_attention_rows():
    """window, fastvit+bias vs sdpa+bias and fastvit+rel_pos vs sdpa+rel_pos: all run on the CPU;
    rel_pos rows have no cls token (N = h * w); fwd+bwd includes the bias's gradient."""
    impls = ["window", "fastvit+bias", "sdpa+bias", "fastvit+rel_pos", "sdpa+rel_pos"]
    records = attention.run(args(seq_lens=SEQ_LENS, impls=impls), Progress(enabled=False))
    by_impl = {}
    for r in records:
        by_impl.setdefault(r.impl, []).append(r)
    assert set(by_impl) == {"window", "fastvit+bias[torch]", "sdpa+bias", "fastvit+rel_pos[torch]", "sdpa+rel_pos"}
    for impl, rows in by_impl.items():
        assert [r.status for r in rows] == ["ok"] * 4, (impl, [(r.status, r.note) for r in rows])
        expected_n = [16, 25] if impl.split("[")[0].endswith("rel_pos") else SEQ_LENS
        assert [r.n_tokens for r in rows] == expected_n * 2, impl
        for r in rows:
            assert r.tflops == pytest.approx(attention.flops(point_of(r)) / (r.ms * 1e-3) / 1e12)
    assert [r.extra["window"] for r in by_impl["window"][:2]] == [14, 14]


def test_rope_attention_rows():
    """fastvit+rope (rotary_qk + flash_attention) vs sdpa+rope (timm's apply_rot_embed_cat + SDPA) on
    a packed qkv with a cls token: both run on the CPU, compute the same attention, and stay out of
    the quick and the default CPU runs unless named (on a GPU the default runs them)."""
    impls = ["fastvit+rope", "sdpa+rope"]
    records = attention.run(args(seq_lens=SEQ_LENS, impls=impls), Progress(enabled=False))
    by_impl = {}
    for r in records:
        by_impl.setdefault(r.impl, []).append(r)
    assert set(by_impl) == {"fastvit+rope[torch]", "sdpa+rope"}
    for impl, rows in by_impl.items():
        assert [r.status for r in rows] == ["ok"] * 4, (impl, [(r.status, r.note) for r in rows])
        assert [r.n_tokens for r in rows] == SEQ_LENS * 2
        assert all(r.extra["num_prefix_tokens"] == 1 for r in rows)
    assert not set(attention.ROPE_IMPLS) & set(attention.QUICK_IMPLS + attention.CPU_DEFAULT_IMPLS)
    assert set(attention.BIAS_IMPLS) <= set(attention.CPU_DEFAULT_IMPLS)  # the CPU default run is as it was
    # the two implementations compute the same thing
    qkv = torch.randn(2, 26, 3, 2, 16)
    rope = attention._rope_table(25, 16, "cpu")
    torch.testing.assert_close(attention._fastvit_rope(qkv, rope), attention._sdpa_rope(qkv, rope))


def test_an_implementation_the_suite_lacks_is_skipped_and_an_unknown_one_refused(capsys):
    """`all --impls eager` ran the attention rows, then failed the varlen suite with a traceback (it
    has no "eager"): each suite now runs the names it has, and the command line refuses a name no
    suite run has, in one line, before measuring anything."""
    assert attention.run(args(impls=["nope"]), Progress(enabled=False)) == []
    assert "none of --impls ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--impls", "nope"])
    assert "--impls ['nope'] are not implementations of the suites run (attention: eager," in capsys.readouterr().err
    parsed = cli.parse_args(["attention", "varlen", "--impls", "eager,fastvit-varlen"])
    assert parsed.impls == ["eager", "fastvit-varlen"]
    assert cli.parse_args(["model", "--impls", "eager"]).impls == ["eager"]  # the model suite ignores it


def test_a_grid_attention_at_one_token_is_an_unavailable_row():
    """--seq-lens 1 (no token grid after the class token) failed the whole attention suite, every
    other point with it: those rows are "unavailable" now; repeated lengths count once."""
    points = attention.points(args(seq_lens=[65, 1, 65], mode="fwd"), "axial")
    assert [(p.n_tokens, bool(p.unavailable)) for p in points] == [(1, True), (65, False)]
    assert "no token grid" in points[0].unavailable


@pytest.mark.parametrize("impl", ["fastvit+rel_pos", "sdpa+rel_pos"])
def test_rel_pos_lengths_giving_one_grid_are_one_row(impl):
    # rel_pos runs N - 1 tokens (SAM: no class token): --seq-lens 1,2 gave two rows of N = 1, one of
    # them unavailable, under one key
    points = attention.points(args(seq_lens=[1, 2, 197], mode="fwd"), impl)
    assert [(p.n_tokens, p.params.get("grid"), bool(p.unavailable)) for p in points] == [
        (1, "1x1", False), (196, "14x14", False)]  # fmt: skip


def test_model_suite_rows():
    records = model.run(args(model="vit_tiny_patch16_224", resolutions=[32, 48], batch=2), Progress(enabled=False))
    impls = ("vit_tiny_patch16_224", "vit_tiny_patch16_224+fastvit")  # a timm model's rows carry its name
    assert [(r.impl, r.mode, r.n_tokens) for r in records] == [
        (impl, mode, n) for impl in impls for mode in ("fwd", "fwd+bwd") for n in (5, 10)
    ]
    for r in records:
        assert r.status == "ok", (r.impl, r.mode, r.note)
        assert (r.heads, r.head_dim, r.batch) == (3, 64, 2)
        assert r.extra["images_per_s"] == pytest.approx(2 / (r.ms * 1e-3))
        assert r.tflops > 0 and r.peak_mem_bytes > 0
        if r.mode == "fwd":
            parts = [r.extra[k] for k in ("ms_patch_embed", "ms_attention", "ms_mlp", "ms_rest")]
            assert all(p >= 0 for p in parts[:3])
            assert sum(parts) == pytest.approx(r.extra["ms_forward_hooked"])
        else:
            assert "ms_attention" not in r.extra
    patched = [r for r in records if r.impl.endswith("+fastvit")]
    assert all(r.note.startswith("patched: ") for r in patched)


def test_model_suite_reports_a_model_it_cannot_build():
    records = model.run(args(model="resnet_no_such_model", resolutions=[32]), Progress(enabled=False))
    assert {r.status for r in records} == {"error"}
    assert "cannot build resnet_no_such_model at 32" in records[0].note


def test_model_suite_default_models_and_their_shapes():
    timm_models = [
        "eva02_base_patch14_224", "vit_base_patch16_rope_reg1_gap_256", "swin_base_patch4_window7_224",
        "samvit_base_patch16", "beitv2_base_patch16_224",
    ]  # fmt: skip
    assert model.model_names(args()) == [model.DEFAULT_MODEL, *timm_models, *model.ZOO]
    assert model.model_names(args(model="tv-swin-b, hf-swin-b")) == ["tv-swin-b", "hf-swin-b"]
    assert model.impls_of("vit_small_patch16_224") == ("vit_small_patch16_224", "vit_small_patch16_224+fastvit")
    assert model.impls_of("hf-dinov2-vit-b14") == ("hf-dinov2-vit-b14", "hf-dinov2-vit-b14+fastvit")
    assert model.depth_of("tv-swin-b", "cpu") == 2 and model.depth_of("tv-swin-b", "cuda") is None
    assert model.depth_of("samvit_base_patch16", "cpu") == 2 and model.depth_of("samvit_base_patch16", "cuda") is None
    assert model.depth_of(model.DEFAULT_MODEL, "cpu") is None  # the timm ViT-B/16 runs whole on the CPU too
    # the GPU runs each at its native size (SAM-B at 1024); the CPU at the same size, SAM-B at 448
    native = {name: model.resolutions(args(device="cuda", quick=False), name) for name in timm_models}
    assert native == {
        "eva02_base_patch14_224": (224,), "vit_base_patch16_rope_reg1_gap_256": (256,),
        "swin_base_patch4_window7_224": (224,), "samvit_base_patch16": (1024,), "beitv2_base_patch16_224": (224,),
    }  # fmt: skip
    assert model.resolutions(args(quick=False), "samvit_base_patch16") == (448,)
    # (tokens, heads, head_dim) of the full models at 224: Swin's first stage is 56 x 56 tokens
    expected = {
        "hf-clip-vit-b16": (197, 12, 64),
        "hf-siglip-base-p16": (196, 12, 64),  # no class token
        "hf-dinov2-vit-b14": (257, 12, 64),
        "hf-swin-b": (3136, 4, 32),
        "tv-swin-b": (3136, 4, 32),
    }
    for name, (n, heads, head_dim) in expected.items():
        shape = model.model_shape(name, 224, 1)
        assert (shape["n_tokens"], shape["heads"], shape["head_dim"]) == (n, heads, head_dim), name
        assert shape["flops_fwd_bwd"] > 2 * shape["flops_fwd"] > 0
    # the timm models at their native sizes (reduced depth: the shape does not depend on it)
    expected = {
        "eva02_base_patch14_224": (257, 12, 64),  # patch 14: 16 x 16 + class token
        "vit_base_patch16_rope_reg1_gap_256": (257, 12, 64),  # 16 x 16 + 1 register token, no class token
        "swin_base_patch4_window7_224": (3136, 4, 32),
        "samvit_base_patch16": (4096, 12, 64),  # 64 x 64, no prefix
        "beitv2_base_patch16_224": (197, 12, 64),
    }
    for name, (n, heads, head_dim) in expected.items():
        shape = model.model_shape(name, native[name][0], 1, model.depth_of(name, "cpu"))
        assert (shape["n_tokens"], shape["heads"], shape["head_dim"]) == (n, heads, head_dim), name


def test_model_suite_zoo_rows():
    # torchvision's Swin-B (stages of 2 blocks) and Hugging Face's CLIP ViT-B/16 (4 blocks), the
    # CPU's reduced depths, at 64 px: 16 x 16 first-stage tokens, 4 x 4 patches + class token
    names = ("tv-swin-b", "hf-clip-vit-b16")
    records = model.run(args(model=",".join(names), resolutions=[64], mode="fwd"), Progress(enabled=False))
    assert [r.impl for r in records] == [impl for name in names for impl in model.impls_of(name)]
    for r in records:
        assert r.status == "ok", (r.impl, r.note)
        assert r.extra["depth"] == model.ZOO[r.extra["model"]].cpu_depth and "reduced on the CPU" in r.note
        parts = [r.extra[k] for k in ("ms_patch_embed", "ms_attention", "ms_mlp", "ms_rest")]
        assert all(p >= 0 for p in parts[:3]) and parts[1] > 0
        assert sum(parts) == pytest.approx(r.extra["ms_forward_hooked"])
    swin, swin_fused, clip, clip_fused = records
    assert (swin.n_tokens, swin.heads, swin.head_dim) == (256, 4, 32)
    assert (clip.n_tokens, clip.heads, clip.head_dim) == (17, 12, 64)
    assert "patched: 8 mlp, 8 attention" in swin_fused.note  # every block: window attention, MLP half
    assert "4 attention" in clip_fused.note  # through transformers' AttentionInterface


def test_model_suite_timm_models_rows():
    # the five timm models of the default set, reduced on the CPU, at 112 px (a multiple of 14 and 16)
    names = list(model.TIMM_MODELS)
    records = model.run(args(model=",".join(names), resolutions=[112], mode="fwd"), Progress(enabled=False))
    assert [r.impl for r in records] == [impl for name in names for impl in model.impls_of(name)]
    tokens = {
        "eva02_base_patch14_224": 65,  # 8 x 8 patches of 14 + class token
        "vit_base_patch16_rope_reg1_gap_256": 50,  # 7 x 7 + register token
        "swin_base_patch4_window7_224": 784,  # 28 x 28 first-stage tokens
        "samvit_base_patch16": 49,  # 7 x 7, no prefix
        "beitv2_base_patch16_224": 50,
    }
    for r in records:
        name = r.extra["model"]
        assert r.status == "ok", (r.impl, r.note)
        assert r.n_tokens == tokens[name] and r.extra["resolution"] == 112
        assert r.extra["depth"] == model.TIMM_MODELS[name].cpu_depth and "reduced on the CPU" in r.note
        parts = [r.extra[k] for k in ("ms_patch_embed", "ms_attention", "ms_mlp", "ms_rest")]
        assert all(p >= 0 for p in parts[:3]) and parts[1] > 0  # Swin's blocks too (layers[i].blocks[j])
        if r.impl.endswith("+fastvit"):  # the patch report's counts: every block's attention at least
            blocks = 8 if "swin" in name else r.extra["depth"]
            patched = r.note.split("patched: ", 1)[1].split(";", 1)[0]
            assert f"{blocks} attention" in patched.split(", "), r.note


def test_model_suite_maps_seq_lens_to_each_models_size():
    # N = prefix + (size / patch)^2: ViT-B/16 and EVA02-B/14 have a class token, SAM-B none
    assert model.token_layout("vit_base_patch16_224") == (16, 1)
    assert model.token_layout("eva02_base_patch14_224") == (14, 1)
    assert model.token_layout("vit_base_patch16_rope_reg1_gap_256") == (16, 1)  # 1 register token
    assert model.token_layout("samvit_base_patch16") == (16, 0)
    assert model.token_layout("hf-siglip-base-p16") == (16, 0)
    sweep = args(seq_lens=[197, 577, 1025, 4097])
    assert model.resolutions(sweep, "vit_base_patch16_224") == (224, 384, 512, 1024)
    assert model.resolutions(sweep, "eva02_base_patch14_224") == (196, 336, 448, 896)
    assert model.resolutions(sweep, "samvit_base_patch16") == (224, 384, 512, 1024)  # 196 ... 4096 tokens
    assert model.resolutions(args(seq_lens=[3136]), "swin_base_patch4_window7_224") == (224,)  # first stage
    # --resolutions wins; the group `scaling` sweeps SCALING_SEQ_LENS unless told otherwise
    assert model.resolutions(args(seq_lens=[197], resolutions=[64, 32]), "eva02_base_patch14_224") == (32, 64)
    scaling = args(model="scaling", quick=False)
    assert model.model_names(scaling) == list(model.SCALING)
    assert model.sweep_seq_lens(scaling) == model.SCALING_SEQ_LENS["cpu"]
    assert model.sweep_seq_lens(args(model="scaling", seq_lens=[65])) == (65,)
    assert model.sweep_seq_lens(args(model="vit_base_patch16_224")) is None


def test_model_suite_sweep_rows_and_slopes():
    # one row per (model, size) at N ~ 5 and 17: EVA02 (patch 14, class token) at 28 and 56 px, SAM
    # (patch 16, no prefix) at 32 and 64 px with 4 and 16 tokens; each model is its own series
    names = ("eva02_base_patch14_224", "samvit_base_patch16")
    records = model.run(args(model=",".join(names), seq_lens=[5, 17], mode="fwd"), Progress(enabled=False))
    assert [(r.impl, r.extra["resolution"], r.n_tokens) for r in records] == [
        (impl, res, n)
        for name, sizes in zip(names, [((28, 5), (56, 17)), ((32, 4), (64, 16))], strict=True)
        for impl in model.impls_of(name)
        for res, n in sizes
    ]
    assert all(r.status == "ok" for r in records), [(r.impl, r.note) for r in records if r.status != "ok"]
    rows = {row[1]: dict(zip(SLOPE_HEADER, row, strict=True)) for row in slope_rows(records)}
    assert set(rows) == {impl for name in names for impl in model.impls_of(name)}
    for impl, row in rows.items():
        assert row["suite"] == "model" and row["points"] == "2" and row["time slope"] != "-", (impl, row)
    assert rows["samvit_base_patch16"]["N range"] == "4-16"


def test_out_naming_a_file_is_refused_before_measuring(tmp_path, capsys):
    """--out at a file measured a suite, then lost it to a FileExistsError traceback."""
    path = tmp_path / "afile"
    path.write_text("")
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--quick", "--out", str(path)])
    assert "is a file; it must be a folder" in capsys.readouterr().err


def test_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys):
    # a folder that cannot be made (under a file) or written: measured a suite, then a traceback
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--quick", "--out", str(blocker / "results")])
    assert "cannot make the folder" in capsys.readouterr().err
    made = tmp_path / "made" / "deeper"
    assert cli.parse_args(["attention", "--quick", "--out", str(made)]).out == made and made.is_dir()


def test_model_suite_hugging_face_sam_row():
    # Hugging Face's SAM ViT-B image encoder, 2 blocks on the CPU (one windowed, one global), at 64 px:
    # 4 x 4 tokens, one padded 14 x 14 window; its own-forward attention swapped (fastvit.nn.hf_sam)
    records = model.run(args(model="hf-sam-vit-b", resolutions=[64], mode="both"), Progress(enabled=False))
    unpatched, patched = model.impls_of("hf-sam-vit-b")
    assert [(r.impl, r.mode) for r in records] == [(unpatched, "fwd"), (unpatched, "fwd+bwd"), (patched, "fwd"),
                                                   (patched, "fwd+bwd")]  # fmt: skip
    for r in records:
        assert r.status == "ok", (r.impl, r.note)
        assert (r.n_tokens, r.heads, r.head_dim) == (16, 12, 64) and r.extra["depth"] == 2
    # SAM's patch embedding is named in the report (fastvit does not fuse it)
    assert all("patched: 2 mlp, 2 attention; 1 skipped" in r.note for r in records[2:])


def test_fastvit_attention_rows_are_labelled_with_the_route_the_tuning_table_picks(tmp_path, monkeypatch):
    # after `tune`, auto runs SDPA where the table measured it faster (69 of 72 attention buckets on
    # an H200): the rows said "fastvit[triton]" there, the label read with no bucket; the op reads
    # the bucket's entry. No GPU runs: only the lookups see a "cuda" device
    from fastvit import tuning
    from fastvit.benchmarks import varlen

    monkeypatch.setenv("FASTVIT_TUNE_TABLE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(tuning, "device_name", lambda device: "Test GPU" if device.type == "cuda" else "cpu")
    key = tuning.attention_bucket(64, torch.bfloat16, 197, 4 * 12, False, False, False)
    tuning.record("Test GPU", "flash_attention", key, {"triton": 2.0, "torch": 1.0})
    point = Point(suite="attention", impl="fastvit", mode="fwd", n_tokens=197, batch=4, heads=12, head_dim=64,
                  dtype="bfloat16", device="cuda")  # fmt: skip
    assert attention._implementation(point)[1] == "fastvit[torch]"
    masked = dataclasses.replace(point, impl="fastvit+bias")  # another bucket: no entry, the GPU's default
    assert attention._implementation(masked)[1] == "fastvit+bias[triton]"
    dense = Point(suite="varlen", impl="fastvit-dense", mode="fwd", n_tokens=4 * 197, batch=4, heads=12,
                  head_dim=64, dtype="bfloat16", device="cuda")  # fmt: skip
    assert varlen._implementation(dense, [197] * 4)[3] == "fastvit-dense[torch]"
    assert varlen._implementation(dense, [197, 197, 197, 50])[3] == "fastvit-dense[mixed]"


def test_patch_embed_says_it_does_not_use_seq_lens(capsys):
    # the suite sweeps image sizes: --seq-lens 65 measured 224 and 384 px without a word
    from types import SimpleNamespace

    from fastvit.benchmarks import patch_embed

    args = SimpleNamespace(impls=["eager-only-in-another-suite"], seq_lens=[65], resolutions=None)
    assert patch_embed.run(args, Progress(enabled=False)) == []
    assert "--seq-lens is not used" in capsys.readouterr().err
