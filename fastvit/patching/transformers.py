"""Hugging Face transformers adapter: ``ViTModel`` and the models built on it
(``ViTForImageClassification``, ``ViTForMaskedImageModeling``) in the transformers 5.x layout:
``ViTAttention`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``), ``ViTLayer``'s LayerNorm+MLP half
(``layernorm_after``, ``mlp.fc1``/``mlp.fc2``) and ``ViTEmbeddings``.

The 4.x layout (``attention.attention.{query,key,value}``, ``intermediate.dense``,
``output.dense``) is recognised and left alone with a message saying so, both when transformers
4.x is installed and for 4.x-layout modules seen beside 5.x.

Every other attention module of a transformers model that goes through transformers'
``AttentionInterface`` (CLIP, SigLIP, SigLIP2, DINOv2, DINOv3, DeiT, ViTMAE, AIMv2, Pixtral, BEiT,
Swin ...) is routed rather than swapped: ``find_interface`` plans switching the configs those
modules read to ``attn_implementation="fastvit"`` (``fastvit.nn.hf_attention``; towers that pass
flash-attn's packed ``cu_seq_lens_q`` to flash-named implementations get ``"fastvit_flash_varlen"``:
one varlen call over all their images), and ``restore_interface`` puts back what each had. The
modules themselves, their hooks and their ``state_dict()`` are untouched. Swin V2's attention,
which computes its scores in its own forward, is swapped (``fastvit.nn.hf_swinv2``); other attention
modules that do (attention-pooling heads, ``nn.MultiheadAttention``) are reported as skipped, with
why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn
import transformers
from transformers.configuration_utils import PretrainedConfig
from transformers.modeling_utils import PreTrainedModel
from transformers.models.florence2.modeling_florence2 import Florence2VisionChannelAttention
from transformers.models.vit import modeling_vit

from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_source import calls_interface, packs_for_flash
from fastvit.patching.checks import exact_type, layernorm_problems, missing_attributes, patch_conv_problems
from fastvit.patching.hf_interface import register_now
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot
from fastvit.patching.report import PatchEntry, PatchReport

__all__ = [
    "FAMILY",
    "INSTALLED_LAYOUT_SUPPORTED",
    "INTERFACE_NAME",
    "InterfaceRouting",
    "find",
    "find_interface",
    "restore_interface",
]

FAMILY = "transformers"
# 5.x has ViTMLP (mlp.fc1/fc2) and ViTAttention with q_proj ...; 4.x has ViTIntermediate/ViTOutput.
INSTALLED_LAYOUT_SUPPORTED = hasattr(modeling_vit, "ViTMLP")

V4_LAYOUT_REASON = (
    "Hugging Face ViT in the transformers 4.x layout (attention.attention.{query,key,value}, "
    "intermediate.dense, output.dense): fastvit patches the 5.x layout (attention.{q,k,v,o}_proj, "
    f"mlp.{{fc1,fc2}}) of transformers >= 5 (installed: {transformers.__version__}); left alone"
)


def _is_v4_layer(module: nn.Module) -> bool:
    """A ViTLayer with 4.x children, whichever transformers defined its class."""
    attention = getattr(module, "attention", None)
    return (
        type(module).__name__ == "ViTLayer"
        and hasattr(module, "intermediate")
        and hasattr(module, "output")
        and hasattr(attention, "attention")
    )


# the names Hugging Face gives a layer's MLP submodule, and its attention's
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "intermediate")
_ATTENTION_NAMES = ("attention", "self_attn", "attn", "self_attention")


def _is_patch_conv(module: nn.Module) -> bool:
    """A plain nn.Conv2d / nn.Conv3d that cuts its input into patches: stride = kernel (ViT's, a
    video's tubelets) or a stride over every dim with overlapping windows (Hiera's and CvT's 7 x 7
    at stride 4)."""
    return type(module) in (nn.Conv2d, nn.Conv3d) and (
        tuple(module.stride) == tuple(module.kernel_size) or min(module.stride) > 1
    )


def _is_patch_embedding(module: nn.Module) -> bool:
    """Whether ``module`` looks like a transformers patch embedding: a class named for an embedding
    (``...Embeddings``, ``...PatchEmbed``) holding, as a direct child, a patch convolution (``_is_patch_conv``) or
    a Linear named for patches (SigLIP2's ``patch_embedding`` over pre-cut patches). Named in the
    report where no fastvit entry covers it or its parent."""
    return (
        _from_transformers(module)
        and "Embed" in type(module).__name__
        and any(
            _is_patch_conv(child) or (type(child) is nn.Linear and "patch" in name)
            for name, child in module._modules.items()
        )
    )


def _patch_conv_outside_an_embedding(path: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module`` is a patch convolution named for patches (``patch_conv``) held directly by a
    transformers module that is no embedding class (Pixtral's vision model holds its own): named in
    the report as the patch embedding fastvit leaves alone."""
    return (
        parent is not None
        and _from_transformers(parent)
        and "Embed" not in type(parent).__name__
        and "patch" in path.rpartition(".")[2]
        and _is_patch_conv(module)
    )


def _is_unknown_layer(module: nn.Module) -> bool:
    """Whether ``module`` looks like a transformers encoder / decoder layer (an attention and an MLP
    submodule under Hugging Face's names) that no fastvit entry covers: named in the report, so that
    its MLP half is not left out of it silently."""
    children = module._modules
    return (
        _from_transformers(module)
        and any(isinstance(children.get(name), nn.Module) for name in _MLP_NAMES)
        and any(isinstance(children.get(name), nn.Module) for name in _ATTENTION_NAMES)
    )


def _v4_findings(model: nn.Module) -> list[Finding]:
    return [
        Skip(path, "model", V4_LAYOUT_REASON)
        for path, module in model.named_modules()
        if _is_v4_layer(module)
    ]


if INSTALLED_LAYOUT_SUPPORTED:  # fastvit.nn.hf_vit subclasses the 5.x classes
    from fastvit.nn import hf_vit as fused
    from fastvit.patching import transformers_families

    _ATTENTIONS = fused_table(fused.FusedViTAttention)
    _LAYERS = fused_table(fused.FusedViTLayer)
    _EMBEDDINGS = fused_table(fused.FusedViTEmbeddings)


def _attention_problems(attn: nn.Module) -> list[str]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config", "attention_dropout")
    return missing_attributes(attn, names, "transformers")


def _attention_notes(attn: nn.Module) -> list[str]:
    p = attn.attention_dropout
    return [f"attention dropout {p}: in training it runs Hugging Face's forward"] if p > 0 else []


def _layer_problems(layer: nn.Module) -> list[str]:
    names = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    problems += exact_type(layer.mlp, "mlp", (modeling_vit.ViTMLP,), "ViTMLP")
    problems += exact_type(layer.dropout, "dropout", (nn.Dropout,), "nn.Dropout")
    if problems:
        return problems
    problems += exact_type(layer.mlp.fc1, "mlp.fc1", (nn.Linear,), "nn.Linear")
    problems += exact_type(layer.mlp.fc2, "mlp.fc2", (nn.Linear,), "nn.Linear")
    if fused.gelu_approximate(layer.mlp.activation_fn) is None:
        act = type(layer.mlp.activation_fn).__qualname__
        problems.append(f"mlp.activation_fn is {act}; the fused op computes GELU (exact or tanh)")
    return problems


def _layer_notes(layer: nn.Module) -> list[str]:
    p = layer.dropout.p
    return [f"hidden dropout {p}: in training its MLP half runs Hugging Face's modules"] if p > 0 else []


def _embedding_problems(emb: nn.Module) -> list[str]:
    patches = emb.patch_embeddings
    problems = exact_type(
        patches, "patch_embeddings", (modeling_vit.ViTPatchEmbeddings,), "ViTPatchEmbeddings"
    )
    return problems or patch_conv_problems(patches.projection, "patch_embeddings.projection")


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s Hugging Face ViT modules (see ``fastvit.patching.registry``)."""
    if not INSTALLED_LAYOUT_SUPPORTED:
        return _v4_findings(model)
    findings: list[Finding] = []
    modules = dict(model.named_modules())
    for path, module in modules.items():
        cls = type(module)
        if cls in _ATTENTIONS:
            findings.append(
                slot(path, module, "attention", _ATTENTIONS[cls], _attention_problems, _attention_notes)
            )
        elif cls in _LAYERS:
            findings.append(slot(path, module, "mlp", _LAYERS[cls], _layer_problems, _layer_notes))
            attn = getattr(module, "attention", None)
            if type(attn) not in _ATTENTIONS:
                findings.append(Skip(join(path, "attention"), "attention", foreign(attn, "ViTAttention")))
        elif cls in _EMBEDDINGS:
            findings.append(slot(path, module, "patch_embed", _EMBEDDINGS[cls], _embedding_problems))
        elif (finding := transformers_families.finding(path, module)) is not None:
            findings.append(finding)
        elif _is_v4_layer(module):
            findings.append(Skip(path, "model", V4_LAYOUT_REASON))
        elif path and _is_unknown_layer(module):  # said, not left out of the report
            findings.append(Skip(path, "mlp", f"{cls.__name__} ({cls.__module__}) is not a layer fastvit fuses: its "
                                 "MLP half runs Hugging Face's modules"))  # fmt: skip
        elif _is_patch_embedding(module) and not _in_fused_embedding(path, modules):  # said, not left out
            findings.append(Skip(path, "patch_embed", f"{cls.__name__} ({cls.__module__}) is not a patch embedding "
                                 "fastvit fuses: it runs Hugging Face's modules"))  # fmt: skip
        elif _patch_conv_outside_an_embedding(path, module, parent := modules.get(path.rpartition(".")[0])):
            owner = type(parent)
            findings.append(Skip(path, "patch_embed", f"{cls.__name__} of {owner.__name__} ({owner.__module__}) is "
                                 "not a patch embedding fastvit fuses: it runs Hugging Face's modules"))  # fmt: skip
    return findings


def _in_fused_embedding(path: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module at ``path`` is the projection holder of an embedding fastvit fuses (ViT's
    ``ViTPatchEmbeddings`` in ``ViTEmbeddings`` ...), which that embedding's entry reports."""
    parent = type(modules.get(path.rpartition(".")[0])) if path else None
    return parent in _EMBEDDINGS or transformers_families.fused_embedding(parent)


# ---------------------------------------------------------------------------------------------
# Attention through transformers' AttentionInterface: routed by config, not swapped
# ---------------------------------------------------------------------------------------------
INTERFACE_NAME = "fastvit"  # fastvit.nn.hf_attention.NAME, without importing it before registration
PACKED_INTERFACE_NAME = "fastvit_flash_varlen"  # hf_attention.PACKED_NAME: for towers that pack their images
FASTVIT_NAMES = (INTERFACE_NAME, PACKED_INTERFACE_NAME)
# Set on each routed attention module (a plain attribute: not in state_dict): the config's
# attn_implementation before fastvit.patch, which fastvit.unpatch restores.
# interface attentions every call of which the interface's fallback sends to SDPA: reported as
# left alone, not as routed (their config, shared with attentions that are routed, still switches)
_ALWAYS_SDPA = {
    Florence2VisionChannelAttention: "Florence2VisionChannelAttention attends between channels: its head dim "
    "is the map's H*W tokens, a strided view the kernels do not read (and mostly beyond their head dims), so "
    "transformers' interface sends each of its calls to SDPA (said once in a warning)",
}
_PREVIOUS = "_fastvit_previous_attn_implementation"  # hf_attention.PREVIOUS_IMPLEMENTATION, which reads it
# Set on each module whose config fastvit.patch replaced by its copy: (the config object it held,
# the list of every module one patch gave copies), which fastvit.unpatch puts back when the copies
# still say what they said (the user's config object is then the model's again).
_ORIGINAL_CONFIG = "_fastvit_original_config"


def _routable(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return calls_interface(type(module)) and hasattr(config, "_attn_implementation_internal")


def _from_transformers(module: nn.Module | None) -> bool:
    return type(module).__module__.startswith("transformers.")


# the modules an attention projects its queries, keys and values with (or holds, as a container)
_PROJECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _attention_like(path: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """A transformers module named *Attention* that projects (a Linear, a conv or an
    ``nn.MultiheadAttention`` below it), or an ``nn.MultiheadAttention`` in one. A module so named
    without any is a part of one (Phi-4-multimodal's RelativeAttentionBias, an embedding table; NeoMME's
    ExclusiveSelfAttention, a projection of an attention's output), not an attention to report."""
    if type(module) is nn.MultiheadAttention:
        return _from_transformers(modules.get(path.rpartition(".")[0]))
    if not (_from_transformers(module) and "Attention" in type(module).__name__):
        return False
    return any(isinstance(m, _PROJECTIONS) for m in module.modules())


def _owner(path: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest ``PreTrainedModel`` enclosing ``path`` (itself excluded), or None."""
    while path:
        path = path.rpartition(".")[0]
        if isinstance(modules[path], PreTrainedModel):
            return modules[path]
    return None


def _sdpa_problem(path: str, modules: dict[str, nn.Module]) -> str | None:
    """fastvit's function follows SDPA's contract; transformers marks the models whose eager
    attention does more (sinks read from the module, in-function softcapping ...) as not SDPA-ready."""
    owner = _owner(path, modules)
    if owner is None or getattr(owner, "_supports_sdpa", True):
        return None
    return (
        f"{type(modules[path]).__qualname__}: transformers marks {type(owner).__name__} as not supporting SDPA "
        "(its eager attention computes more than softmax(q.k) v), whose contract fastvit's attention follows: "
        "left alone"
    )


def _dropout_notes(module: nn.Module) -> list[str]:
    p = getattr(module, "attention_dropout", getattr(module, "dropout", 0.0))
    p = p.p if isinstance(p, nn.Dropout) else p
    if isinstance(p, (int, float)) and p > 0:
        return [f"attention dropout {p}: in training it runs transformers' sdpa attention"]
    return []


def _not_routed_reason(path: str, module: nn.Module, parents: dict[str, nn.Module]) -> str:
    if type(module) is nn.MultiheadAttention:
        parent = parents.get(path.rpartition(".")[0])
        inside = f" (in {type(parent).__qualname__})" if parent is not None else ""
        return f"nn.MultiheadAttention{inside} does not go through transformers' AttentionInterface: left alone"
    if calls_interface(type(module)):  # reads the interface, but not through a config fastvit can set
        return f"{type(module).__qualname__} has no transformers config to set attn_implementation on: left alone"
    return (
        f"{type(module).__qualname__} computes its attention in its own forward, not through transformers' "
        "AttentionInterface: left alone"
    )


@dataclass
class InterfaceRouting:
    """The attention modules ``fastvit.patch`` switches to ``attn_implementation="fastvit"``.

    Attributes:
        routes: (path, attention module) pairs, in model order.
        notes: what the report adds per path (dropout fallbacks).
        modules: every module of the model (``named_modules``), whose config references ``apply``
            points at the model's own copies.
    """

    routes: list[tuple[str, nn.Module]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.routes)

    def apply(self, report: PatchReport) -> None:
        """Switch each module's config to ``"fastvit"`` (remembering the previous value on the
        module) and list the modules in ``report.replaced``.

        The configs switched are the model's own: each config object a routed module reads is
        replaced, on every module of the model holding it, by a shallow copy. Models built from one
        config object (``Model(config)`` twice: teacher and student, an EMA copy) share it, and
        patching one must not switch the others."""
        self._own_configs()
        names = self._names()
        for path, module in self.routes:  # read every previous value before any config changes
            previous = module.config._attn_implementation_internal
            setattr(module, _PREVIOUS, previous)
            name = names[id(module.config)]
            how = "fastvit.flash_attention through transformers' AttentionInterface"
            if name == PACKED_INTERFACE_NAME:
                how = (
                    "fastvit.flash_attention_varlen through transformers' AttentionInterface, one call over the "
                    "packed images: transformers passes their cu_seq_lens_q only to implementations named *flash*"
                )
            detail = f"{type(module).__name__}: attn_implementation {previous!r} -> {name!r} ({how})"
            report.replaced.append(PatchEntry(path, "attention", "; ".join((detail, *self.notes.get(path, ())))))
        for _, module in self.routes:
            module.config._attn_implementation_internal = names[id(module.config)]

    def _names(self) -> dict[int, str]:
        """The implementation each routed config gets, by id: ``PACKED_INTERFACE_NAME`` where every
        routed module reading it packs its images for flash-named implementations (its class or the
        model that owns the config, ``packs_for_flash``), else ``INTERFACE_NAME``. The name is read
        by every module holding the config, so one module that would take it for flash-attn's
        conventions without packing keeps the whole config on ``"fastvit"``. Each is a
        ``RoutedName`` remembering the config's implementation before (``config.output_attentions``
        and the masks follow it), read before any config changes."""
        from fastvit.nn.hf_attention import RoutedName  # registered by now (find_interface)

        packs: dict[int, bool] = {}
        previous: dict[int, str | None] = {}
        for path, module in self.routes:
            owner = _owner(path, self.modules)
            owned = owner is not None and owner.config is module.config and packs_for_flash(type(owner))
            packs[id(module.config)] = packs.get(id(module.config), True) and (packs_for_flash(type(module)) or owned)
            previous[id(module.config)] = module.config._attn_implementation_internal
        return {
            key: RoutedName(PACKED_INTERFACE_NAME if packed else INTERFACE_NAME, previous[key])
            for key, packed in packs.items()
        }

    def _own_configs(self) -> None:
        """Copy the routed modules' configs, and the model's configs that hold one of them as a
        sub-config (``CLIPConfig.vision_config``, at any depth, so that ``model.config`` still
        describes what runs), and point every module of the model at the copies."""
        held = {id(c): c for m in self.modules.values() if isinstance(c := vars(m).get("config"), PretrainedConfig)}
        originals = {id(module.config): module.config for _, module in self.routes}
        grew = True
        while grew:  # a config holding a copied one is copied too
            parents = {key: c for key, c in held.items() if key not in originals and any(
                id(v) in originals and v is originals[id(v)] for v in vars(c).values())}  # fmt: skip
            originals.update(parents)
            grew = bool(parents)
        copies = {key: copy.copy(config) for key, config in originals.items()}
        for config in copies.values():
            for name, value in list(vars(config).items()):
                if id(value) in originals and value is originals[id(value)]:
                    setattr(config, name, copies[id(value)])
        given: list[nn.Module] = []  # the modules this patch gives copies, all restored together or none
        for module in self.modules.values():
            config = vars(module).get("config")
            if config is not None and config is originals.get(id(config)):
                module.config = copies[id(config)]
                setattr(module, _ORIGINAL_CONFIG, (config, given))
                given.append(module)


def find_interface(model: nn.Module, report: PatchReport, claimed: dict[int, str]) -> InterfaceRouting:
    """Plan routing ``model``'s interface attention through fastvit; changes nothing.

    Registers ``"fastvit"`` with transformers first (a no-op if the import hook did). Modules
    already on ``"fastvit"`` go to ``report.already_patched``, attention modules that bypass the
    interface to ``report.skipped`` with the reason.

    Args:
        model: any module holding transformers models (a VLM's vision tower, a CLIPModel ...).
        report: where skips and earlier patches are recorded.
        claimed: {id: part} of the modules a module swap of this patch already covers (ViT's
            attention: ``"attention"``; a layer's MLP half: ``"mlp"``).
    """
    modules = dict(model.named_modules())
    routing = InterfaceRouting(modules=modules)
    if not any(_from_transformers(m) for m in modules.values()):
        return routing  # no transformers module in this model: nothing to register or report
    problem = register_now()
    if problem is not None:
        report.skipped.append(PatchEntry("", "attention", f"attn_implementation='fastvit' unavailable: {problem}"))
        return routing
    attention_paths = [p for p, m in modules.items() if _attention_like(p, m, modules) or _routable(m)]
    # attention a module swap of this patch left alone (Swin V2's, with a hook): already said, with why
    said = {e.path for e in report.skipped if e.part == "attention"}
    # the attentions a module swap covers: their submodules (CvT's *AttentionConvProjection) are theirs
    parts = {p: claimed.get(id(m), getattr(m, "fastvit_part", None)) for p, m in modules.items()}
    swapped = tuple(f"{p}." for p, part in parts.items() if p and part == "attention")
    # a module named *Attention* inside an attention that goes through the interface is one of its parts
    # (NeoMME's ExclusiveSelfAttention, a projection applied to the interface's output), not an attention
    routable = tuple(f"{p}." for p, m in modules.items() if p and _routable(m))
    for path, module in modules.items():
        if id(module) in claimed or isinstance(module, FusedModule) or path.startswith(swapped):
            continue  # a module swap covers it (and the report lists it)
        if type(module) in _ALWAYS_SDPA:
            report.skipped.append(PatchEntry(path, "attention", _ALWAYS_SDPA[type(module)]))
            continue
        if _routable(module):
            if (problem := _sdpa_problem(path, modules)) is not None:
                report.skipped.append(PatchEntry(path, "attention", problem))
            elif (name := module.config._attn_implementation) in FASTVIT_NAMES:
                how = "an earlier fastvit.patch" if hasattr(module, _PREVIOUS) else f"attn_implementation={name!r}"
                detail = f"{type(module).__name__} runs fastvit through transformers' AttentionInterface ({how})"
                report.already_patched.append(PatchEntry(path, "attention", detail))
            else:
                routing.routes.append((path, module))
                routing.notes[path] = _dropout_notes(module)
            continue
        if not _attention_like(path, module, modules) or path.startswith(routable):
            continue
        inner = any(other.startswith(f"{path}.") for other in attention_paths) if path else len(attention_paths) > 1
        if not inner and path not in said:  # a container (Swinv2Attention around its self-attention) is not reported
            report.skipped.append(PatchEntry(path, "attention", _not_routed_reason(path, module, modules)))
    routed = {path for path, _ in routing.routes}  # e.g. a ViTAttention the module swap had to skip
    report.skipped[:] = [e for e in report.skipped if not (e.part == "attention" and e.path in routed)]
    return routing


def restore_interface(model: nn.Module) -> list[PatchEntry]:
    """Undo ``InterfaceRouting.apply``: each routed module's config gets back the
    ``attn_implementation`` it had (unless it was changed again since). Returns what was restored."""
    routed = [(path, module) for path, module in model.named_modules() if _PREVIOUS in vars(module)]
    # every name read before any config changes: modules sharing a config (a tower's layers) all
    # report what they ran
    names = [module.config._attn_implementation_internal for _, module in routed]
    restored = []
    for (path, module), name in zip(routed, names, strict=True):
        previous = vars(module).pop(_PREVIOUS)
        if name in FASTVIT_NAMES:
            module.config._attn_implementation_internal = previous
            detail = f"{type(module).__name__}: attn_implementation {name!r} -> {previous!r}"
        else:  # set otherwise since fastvit.patch (set_attn_implementation): left as it is
            detail = f"{type(module).__name__}: attn_implementation {name!r} left as set since fastvit.patch"
        restored.append(PatchEntry(path, "attention", detail))
    _restore_configs(model)
    return restored


def _same_settings(config: PretrainedConfig, original: PretrainedConfig) -> bool:
    """Whether the model's copy of a config says what the original says, attribute by attribute
    (``_attn_implementation_internal`` included, which a config class's dataclass ``==`` skips;
    sub-configs compared so); False where a setting changed since ``fastvit.patch``, or cannot be
    compared."""
    mine, theirs = vars(config), vars(original)
    if mine.keys() != theirs.keys():
        return False
    for key, value in mine.items():
        other = theirs[key]
        if isinstance(value, PretrainedConfig) and isinstance(other, PretrainedConfig):
            if not _same_settings(value, other):
                return False
            continue
        try:
            if not (value is other or bool(value == other)):
                return False
        except Exception:  # a setting whose == is not a bool (a tensor): keep the copy
            return False
    return True


def _restore_configs(model: nn.Module) -> None:
    """Put back the config objects ``InterfaceRouting._own_configs`` replaced, on every module that
    held one, when every copy's settings are the original's again (their attn_implementation
    restored): a config the user holds is then the model's once more. The modules one patch gave
    copies are restored together or not at all: if one copy changed since the patch
    (``model.config.output_hidden_states = True``, ``set_attn_implementation``), all stay, with what
    was set on them, and ``fastvit.unpatch`` of a part (the vision tower of a patched CLIPModel)
    restores none, leaving them to the unpatch of the whole (a parent copy holds its sub-configs'
    copies: restoring some would split ``model.config.vision_config`` from the tower's config)."""
    inside = {id(m) for m in model.modules()}
    groups: dict[int, list[nn.Module]] = {}  # each patch's list of modules given copies, by id
    for module in model.modules():
        if (held := vars(module).get(_ORIGINAL_CONFIG)) is not None:
            groups[id(held[1])] = held[1]
    for given in groups.values():
        if not all(id(m) in inside for m in given):
            continue  # a part of what one patch gave copies: left for the unpatch of the whole
        originals = [(m, vars(m).pop(_ORIGINAL_CONFIG)[0]) for m in given]
        if all(_same_settings(module.config, original) for module, original in originals):
            for module, original in originals:
                module.config = original
