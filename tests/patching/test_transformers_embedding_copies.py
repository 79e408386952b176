"""Hugging Face's copies of the CLIP (CLIPSeg's interpolating by default), SigLIP, DINOv2-with-registers
and DINOv3 embeddings, OWL-ViT's (with its copy OWLv2) and InternVL's (BEiT's forward; with its
copy in Qianfan-OCR), as one fastvit.patch_embed call (fastvit.nn.hf_embeddings:
``EMBEDDING_COPIES``, ``FusedOwlViTVisionEmbeddings``, ``FusedInternVLVisionEmbeddings``).

Each copy's ``forward`` and ``__init__`` are checked line for line against the installed source of
what it copies (the two ``__init__`` that differ, by the lines they differ in), so that a
transformers release changing a copy fails here rather than running another model's math. Each
embedding, patched inside its model, against the unpatched one by the tolerance rule (output and
every gradient, in float64) with the op called on the model's own Parameters; OWL-ViT's own rules
(any grid of the trained patch count, Hugging Face's forward for the rest); unpatch; the Triton
kernels in the interpreter. Tiny configs (16 px images, 4 x 4 patches, dim 32), no downloads.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, images, perturb_, source_lines

transformers = pytest.importorskip("transformers")
T = transformers

from transformers.models.beit.modeling_beit import BeitEmbeddings  # noqa: E402
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerVisionModel  # noqa: E402
from transformers.models.clipseg.modeling_clipseg import CLIPSegVisionEmbeddings  # noqa: E402
from transformers.models.eomt_dinov3.modeling_eomt_dinov3 import EomtDinov3Embeddings  # noqa: E402
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings  # noqa: E402
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionModel  # noqa: E402
from transformers.models.owlvit.modeling_owlvit import OwlViTVisionEmbeddings  # noqa: E402
from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionEmbeddings  # noqa: E402

from fastvit.nn import hf_embeddings  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)  # fmt: skip


def _eomt_dinov3() -> nn.Module:
    # the segmentation model needs scipy (its loss); its embeddings alone, in a container
    config = T.EomtDinov3Config(hidden_size=32, num_attention_heads=2, image_size=16, patch_size=4,
                                num_register_tokens=2)  # fmt: skip
    embeddings = EomtDinov3Embeddings(config)
    with torch.no_grad():  # torch.empty: the model's post_init would set them, not the module alone
        embeddings.register_tokens.normal_(generator=torch.Generator().manual_seed(3))
    return nn.ModuleDict({"embeddings": embeddings})


# {embedding class: a tiny model holding it}
MODELS: dict[type, Callable[[], nn.Module]] = {
    T.models.altclip.modeling_altclip.AltCLIPVisionEmbeddings: lambda: T.AltCLIPVisionModel(
        T.AltCLIPVisionConfig(**VISION)
    ),
    T.models.bridgetower.modeling_bridgetower.BridgeTowerVisionEmbeddings: lambda: BridgeTowerVisionModel(
        T.BridgeTowerVisionConfig(**(VISION | dict(hidden_size=64)))  # its heads are hidden_size // 64
    ),
    T.models.chinese_clip.modeling_chinese_clip.ChineseCLIPVisionEmbeddings: lambda: T.ChineseCLIPVisionModel(
        T.ChineseCLIPVisionConfig(**VISION)
    ),
    T.models.git.modeling_git.GitVisionEmbeddings: lambda: T.GitVisionModel(T.GitVisionConfig(**VISION)),
    CLIPSegVisionEmbeddings: lambda: T.CLIPSegVisionModel(T.CLIPSegVisionConfig(**VISION)),
    T.models.kosmos2.modeling_kosmos2.Kosmos2VisionEmbeddings: lambda: Kosmos2VisionModel(
        T.Kosmos2VisionConfig(**VISION)
    ),
    T.models.metaclip_2.modeling_metaclip_2.MetaClip2VisionEmbeddings: lambda: T.MetaClip2VisionModel(
        T.MetaClip2VisionConfig(**VISION)
    ),
    T.models.x_clip.modeling_x_clip.XCLIPVisionEmbeddings: lambda: T.XCLIPVisionModel(T.XCLIPVisionConfig(**VISION)),
    OwlViTVisionEmbeddings: lambda: T.OwlViTVisionModel(T.OwlViTVisionConfig(**VISION)),
    T.models.owlv2.modeling_owlv2.Owlv2VisionEmbeddings: lambda: T.Owlv2VisionModel(T.Owlv2VisionConfig(**VISION)),
    T.models.granite_docling.modeling_granite_docling.GraniteDoclingVisionEmbeddings: lambda: (
        T.GraniteDoclingVisionModel(T.GraniteDoclingVisionConfig(**VISION))
    ),
    Step3p7VisionEmbeddings: lambda: T.Step3p7VisionModel(T.Step3p7VisionConfig(**VISION)),
    T.models.tipsv2.modeling_tipsv2.Tipsv2VisionEmbeddings: lambda: T.Tipsv2VisionModel(
        T.Tipsv2VisionConfig(**VISION)
    ),
    EomtDinov3Embeddings: _eomt_dinov3,
    InternVLVisionEmbeddings: lambda: T.InternVLVisionModel(T.InternVLVisionConfig(**VISION)),
    T.models.qianfan_ocr.modeling_qianfan_ocr.QianfanOCRVisionEmbeddings: lambda: T.QianfanOCRVisionModel(
        T.QianfanOCRVisionConfig(**VISION)
    ),
}
NAMES = {cls: cls.__name__ for cls in MODELS}

# The __init__ lines a copy has in place of the original's (-) and besides them (+), config names as X
INIT_DIFFERENCES = {
    Step3p7VisionEmbeddings: (  # the same patchify conv, without a bias
        {"out_channels=self.embed_dim,", "kernel_size=self.patch_size,", "stride=self.patch_size,",
         'padding="valid",'},
        {"out_channels=config.hidden_size,", "kernel_size=config.patch_size,", "stride=config.patch_size,",
         "bias=False,"},
    ),
    EomtDinov3Embeddings: (set(), {"self.num_prefix_tokens = 1 + config.num_register_tokens"}),
}  # fmt: skip


# The forward lines a copy has in place of the original's: {copy: {its line: the original's}}
FORWARD_DIFFERENCES = {
    CLIPSegVisionEmbeddings: {  # interpolating by default
        "def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=True) -> torch.Tensor:":
        "def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False) -> torch.Tensor:",
    },
}


def _lines(function: Callable, *names: str) -> list[str]:
    """``source_lines`` with every config class name (``AltCLIPVisionConfig`` ...) as X."""
    return [re.sub(r"\b\w*Config\b", "X", line) for line in source_lines(function, *names)]


def _early_return(function: Callable, names: tuple[str, ...]) -> list[str]:
    """The lines of Hugging Face's interpolation that return the learned position embedding (the rule
    the fused forward stands for: its resampling branch is Hugging Face's whatever it computes)."""
    lines = _lines(function, *names)
    start = next(i for i, line in enumerate(lines) if "is_tracing" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("return"))
    return lines[start : end + 1]


class _Embeds(nn.Module):
    """The embedding of a whole model (patched as users patch: the model), pixels -> tokens."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule(self.path)(x)


def pair(cls: type) -> tuple[_Embeds, _Embeds, fastvit.PatchReport]:
    model = perturb_(MODELS[cls]()).eval()
    (path,) = [p for p, m in model.named_modules() if type(m) is cls]
    reference = _Embeds(model, path)
    patched = copy.deepcopy(reference)
    return reference, patched, fastvit.patch(patched)


def test_every_copy_owl_vit_and_internvl_have_a_model_here():
    assert set(MODELS) == set(hf_embeddings.EMBEDDING_COPIES) | {OwlViTVisionEmbeddings, InternVLVisionEmbeddings}


@pytest.mark.parametrize("cls", list(hf_embeddings.EMBEDDING_COPIES), ids=lambda c: c.__name__)
def test_copies_are_line_for_line(cls):
    entry = hf_embeddings.EMBEDDING_COPIES[cls]
    names = (cls.__name__, entry.copies.__name__)
    holder = hf_embeddings.FUSED_EMBEDDINGS[entry.copies].fastvit_patch_holder  # what the copy's holder copies
    if entry.patch_holder is not None:  # the two holder classes, named alike
        names += (entry.patch_holder.__name__, holder.__name__)
    differences = FORWARD_DIFFERENCES.get(cls, {})
    ours = _lines(cls.forward, *names)
    assert [differences.get(line, line) for line in ours] == _lines(entry.copies.forward, *names)
    assert set(differences) <= set(ours)  # the differences named are the ones there are
    ours, theirs = _lines(cls.__init__, *names), _lines(entry.copies.__init__, *names)
    removed, added = INIT_DIFFERENCES.get(cls, (set(), set()))
    assert [line for line in theirs if line not in removed] == [line for line in ours if line not in added]
    assert removed <= set(theirs) and added <= set(ours)  # the differences named are the ones there are
    if entry.patch_holder is not None:  # TIPSv2's and Qianfan-OCR's own projection holders
        for method in ("__init__", "forward"):
            assert _lines(getattr(entry.patch_holder, method), *names) == _lines(getattr(holder, method), *names)
    for method in entry.layout.fastvit_bypassed_methods:  # the interpolation's rule, which the fused forward reads
        assert _early_return(getattr(cls, method), names) == _early_return(getattr(entry.copies, method), names)


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_embeddings_match_unpatched_with_the_models_parameters(cls, op_calls):
    reference, patched, report = pair(cls)
    embeddings = patched.model.get_submodule(patched.path)
    assert type(embeddings).__name__ == f"Fused{cls.__name__}" and isinstance(embeddings, cls)
    assert report.counts()["patch_embed"] == 1 and not [e for e in report.skipped if e.part == "patch_embed"]
    assert_matches_by_the_rule(reference, patched, images())
    (call,) = op_calls["patch_embed"][:1]
    conv = embeddings.patch_embeddings if cls is EomtDinov3Embeddings else getattr(
        embeddings, "patch_embedding", None) or embeddings.patch_embeddings.projection  # fmt: skip
    assert call["args"][1] is conv.weight and call["args"][2] is conv.bias
    fastvit.unpatch(patched)
    assert type(patched.model.get_submodule(patched.path)) is cls


@pytest.mark.parametrize("cls", [OwlViTVisionEmbeddings, T.models.owlv2.modeling_owlv2.Owlv2VisionEmbeddings],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_owl_vit_any_grid_of_its_patch_count_and_hugging_face_for_the_rest(cls, op_calls):
    reference, patched, _ = pair(cls)
    assert_matches_by_the_rule(reference, patched, images(size=(8, 32)))  # 2 x 8 patches: Hugging Face adds
    assert_matches_by_the_rule(reference, patched, images(size=(18, 17)))  # the same count; partial patches dropped
    assert len(op_calls["patch_embed"]) == 2
    ref_emb, emb = (m.model.get_submodule(m.path) for m in (reference, patched))
    x = images(size=24)  # 36 patches: only with interpolate_pos_encoding, Hugging Face's forward
    torch.testing.assert_close(emb(x, interpolate_pos_encoding=True), ref_emb(x, interpolate_pos_encoding=True))
    for model in (ref_emb, emb):  # Hugging Face's errors: another patch count, another dtype
        with pytest.raises(RuntimeError):
            model(x)
        with pytest.raises(RuntimeError):
            model(images().double())
    assert len(op_calls["patch_embed"]) == 2


def test_clipseg_interpolates_by_default_where_hugging_face_resamples(op_calls):
    """CLIPSeg's embedding interpolates by default: at the trained size Hugging Face's interpolation
    returns the learned position embedding (fused: one op call), at another it resamples (Hugging
    Face's forward, no op call); CLIP's, asked to interpolate at its trained size, is fused too."""
    reference, patched, _ = pair(CLIPSegVisionEmbeddings)
    assert_matches_by_the_rule(reference, patched, images())  # 16 x 16, the trained size
    assert len(op_calls["patch_embed"]) == 1
    ref_emb, emb = (m.model.get_submodule(m.path) for m in (reference, patched))
    x = images(size=24)
    torch.testing.assert_close(emb(x), ref_emb(x))  # 6 x 6 patches: resampled
    assert len(op_calls["patch_embed"]) == 1
    clip = perturb_(T.CLIPVisionModel(T.CLIPVisionConfig(**VISION))).eval()
    clip_patched = copy.deepcopy(clip)
    fastvit.patch(clip_patched)
    want, got = (m(images(), interpolate_pos_encoding=True).last_hidden_state for m in (clip, clip_patched))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(op_calls["patch_embed"]) == 2


def test_internvl_runs_beits_fused_forward_and_casts_the_pixels_as_its_holder(op_calls):
    """InternVL's embedding is BEiT's forward line for line (its masked-token blend weight named
    ``w``) under BEiT's interpolation rule, and its projection holder casts the pixels to the conv's
    dtype: the fused call casts too (float32 pixels into a float64 model). ``bool_masked_pos``,
    another grid (resampled), another channel count (Hugging Face's error) run Hugging Face's."""
    names = (InternVLVisionEmbeddings.__name__, BeitEmbeddings.__name__)
    ours = [re.sub(r"\bw\b", "mask", line) for line in _lines(InternVLVisionEmbeddings.forward, *names)]
    assert ours == _lines(BeitEmbeddings.forward, *names)
    rule = "if not torch.jit.is_tracing() and num_patches == num_positions and height == width:"
    for cls in (InternVLVisionEmbeddings, BeitEmbeddings):
        assert rule in _lines(cls.interpolate_pos_encoding)
    holder = hf_embeddings.FusedInternVLVisionEmbeddings.fastvit_patch_holder
    assert "embeddings = self.projection(pixel_values.to(self.projection.weight.dtype))" in _lines(holder.forward)

    reference, patched, _ = pair(InternVLVisionEmbeddings)
    reference.double(), patched.double()
    torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-12, atol=1e-12)
    assert len(op_calls["patch_embed"]) == 1 and op_calls["patch_embed"][0]["args"][0].dtype == torch.float64
    ref_emb, emb = (m.model.get_submodule(m.path) for m in (reference, patched))
    x = images().double()
    masked = torch.zeros(x.shape[0], 16, dtype=torch.bool)
    masked[:, ::3] = True
    emb.mask_token = ref_emb.mask_token = nn.Parameter(torch.randn(1, 1, 32, dtype=torch.float64))
    torch.testing.assert_close(emb(x, bool_masked_pos=masked), ref_emb(x, bool_masked_pos=masked))
    torch.testing.assert_close(emb(images(size=24).double()), ref_emb(images(size=24).double()))  # resampled
    assert len(op_calls["patch_embed"]) == 1
    for model in (ref_emb, emb):
        with pytest.raises(ValueError, match="channel dimension"):
            model(torch.randn(2, 4, 16, 16, dtype=torch.float64))


def test_an_interpolation_replaced_on_a_clip_embedding_is_called(op_calls, fresh_warnings):
    """CLIP's fused forward (here MetaCLIP 2's copy) stands for Hugging Face's interpolation at the trained size; an
    interpolation replaced on the instance is called there, through Hugging Face's forward."""
    reference, patched, _ = pair(T.models.metaclip_2.modeling_metaclip_2.MetaClip2VisionEmbeddings)
    emb = patched.model.get_submodule(patched.path)
    emb.interpolate_pos_encoding = lambda embeddings, height, width: torch.ones_like(embeddings[:1])
    with pytest.warns(fastvit.FastvitFallbackWarning, match="interpolate_pos_encoding replaced"):
        got = emb(images(), interpolate_pos_encoding=True)
    want = reference.model.get_submodule(reference.path)(images())
    torch.testing.assert_close(got, want - reference.model.get_submodule(reference.path).position_embedding.weight + 1)
    assert op_calls["patch_embed"] == []


def test_a_hook_on_a_copys_projection_runs_hugging_face(op_calls, fresh_warnings):
    cls = T.models.metaclip_2.modeling_metaclip_2.MetaClip2VisionEmbeddings
    reference, patched, _ = pair(cls)
    for model in (reference, patched):
        model.model.get_submodule(model.path).patch_embedding.register_forward_hook(lambda m, a, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()))
    assert op_calls["patch_embed"] == []


@pytest.mark.interpreter
def test_triton_route(op_calls):
    for cls in (OwlViTVisionEmbeddings, Step3p7VisionEmbeddings, EomtDinov3Embeddings,
                T.models.tipsv2.modeling_tipsv2.Tipsv2VisionEmbeddings, InternVLVisionEmbeddings):  # fmt: skip
        reference, patched, _ = pair(cls)
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["patch_embed"]) == 5
