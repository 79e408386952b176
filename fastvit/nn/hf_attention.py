"""fastvit as a Hugging Face attention implementation: ``attn_implementation="fastvit"``.

transformers (>= 5) routes the attention of most of its models through one function looked up by
name in ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)``), and builds their masks through the function of the same name in
``AttentionMaskInterface``. ``register()`` adds ``"fastvit"`` to both: the attention runs
``fastvit.flash_attention`` (``fastvit.flash_attention_varlen`` where the model passes flash-attn's
``cu_seq_lens_q``), and the masks are SDPA's (bool, True = attend; ``None`` when nothing is masked),
which the op takes as ``attn_mask`` -- or, on a config ``fastvit.patch`` switched from eager
attention, an additive float mask as eager's (0 / finfo.min / 4; ``fastvit_mask``), which models
such as BEiT add their bias to, as they did unpatched. Without a mask function of its own, a custom name gets no mask
at all (transformers drops padding masks for it), hence both registrations. ``PACKED_NAME``
(``"fastvit_flash_varlen"``) is the same pair under a name transformers reads as flash-attn's, for
the vision towers that then pack their images (``fastvit.patch`` sets it on their configs).

Calls the op does not cover run transformers' own function for that call, with one warning:
attention weights requested of a model patched over eager attention (``output_attentions=True``:
the model's ``eager_attention_forward``; over SDPA, flash-attn or flex no weights, as theirs),
attention dropout in training, and value head dim != query head dim (SDPA), softcapping and
attention sinks (eager).

``register()`` runs when ``transformers.modeling_utils`` is imported, before or after fastvit
(``fastvit.patching.hf_interface``). Importing this module imports transformers (not its
``modeling_utils``).
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable

import torch
import torch.nn as nn
from transformers.configuration_utils import PretrainedConfig
from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # transformers' output capture (output_attentions=True fills it through forward hooks)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another transformers layout: only the output_attentions kwarg is seen
    _active_collector = None

import fastvit
from fastvit.nn.fused import FusedModule, dropout_active, warn_attention_dropout, warn_fallback
from fastvit.nn.hf_source import packs_for_flash

__all__ = [
    "NAME",
    "PACKED_NAME",
    "RoutedName",
    "capturing_attentions",
    "fallback_reason",
    "fastvit_attention_forward",
    "fastvit_mask",
    "register",
    "swapped_attention_covers",
]

NAME = "fastvit"
# The same function under a name transformers reads as a flash-attn implementation
# (``utils.generic.is_flash_attention_requested``: "flash" in the name). Models written for
# flash-attn's packed calls (the Qwen-VL, GLM-4V, Kimi, PaddleOCR-VL vision towers; Pixtral) then
# pass their images as one packed sequence with ``cu_seq_lens_q`` instead of calling the attention
# once per image or window (or with a block-diagonal (T, T) mask): one ``flash_attention_varlen``
# launch. ``fastvit.patch`` sets it only on the configs of such towers (their masks stay SDPA's:
# the mask function is SDPA's as for NAME); transformers' model checks take it (_accept_packed_name).
PACKED_NAME = "fastvit_flash_varlen"


def returns_weights(implementation: str | None) -> bool:
    """Whether the unpatched ``attn_implementation`` returns attention weights: eager (and a name
    of the model's own, or None) does; SDPA, flash-attn and flex attention return None."""
    return not (isinstance(implementation, str) and any(name in implementation for name in ("sdpa", "flash", "flex")))


class RoutedName(str):
    """The ``attn_implementation`` ``fastvit.patch`` sets on a config (``NAME`` or ``PACKED_NAME``):
    equal to that name everywhere transformers reads it (a ``str``), remembering the implementation
    the config had before (``previous``), which decides what ``config.output_attentions = True``
    does (``_accept_output_attentions``). Kept in ``_attn_implementation_internal``, which
    transformers never serializes; survives ``copy.deepcopy`` and pickling of the model.

    Example:
        >>> name = RoutedName("fastvit", "eager")
        >>> name == "fastvit", name.previous
        (True, 'eager')
    """

    previous: str | None

    def __new__(cls, name: str, previous: str | None) -> RoutedName:
        routed = super().__new__(cls, name)
        routed.previous = previous
        return routed

    def __reduce__(self) -> tuple:
        return RoutedName, (str(self), self.previous)


def _eager_of(module: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of ``module``'s modeling file (each has its own), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def capturing_attentions() -> bool:
    """Whether the model's ``capture_outputs`` is collecting attention weights in this call.

    Many attention modules (CLIP, SigLIP, SigLIP2 ...) do not pass ``output_attentions`` on to the
    attention function; the collector the model's forward sets is how transformers knows.
    """
    if _active_collector is None:
        return False
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", False):
        return False  # no capture started inside this graph (and a ContextVar read does not trace)
    collected = _active_collector.get()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


def swapped_attention_covers(
    module: FusedModule,
    output_attentions: bool | None,
    dropout_p: float,
    dropout_training: bool,
    *,
    returns_weights: bool = True,
) -> bool:
    """Whether the fused forward of a swapped Hugging Face attention (one computing its scores in its
    own forward, which ``attn_implementation`` cannot route: SAM's, Swin V2's) computes this call:
    no attention weights asked for (``output_attentions``, or transformers' output capture collecting
    them), no attention dropout Hugging Face's forward would apply in this call (``dropout_p`` while
    ``dropout_training``: said once), nothing the fused forward replaces or bypasses changed since
    patching (``FusedModule._fastvit_intact``). Otherwise the call runs Hugging Face's forward.
    ``returns_weights=False`` for an original that returns no weights even when asked (an SDPA
    class: data2vec-vision's), whose fused forward then returns None for them too."""
    wants_weights = returns_weights and (output_attentions or capturing_attentions())
    if wants_weights or not module._fastvit_intact():
        return False
    if dropout_active(dropout_p, dropout_training):
        warn_attention_dropout(f"Hugging Face {type(module).fastvit_original().__name__}", dropout_p)
        return False
    return True


# The attribute ``fastvit.patch`` sets on each attention module it routes here: the
# ``attn_implementation`` its config had (``fastvit.patching.transformers._PREVIOUS``).
PREVIOUS_IMPLEMENTATION = "_fastvit_previous_attn_implementation"


def _wants_weights(module: nn.Module, kwargs: dict) -> bool:
    """Whether this call asks for attention weights that the implementation ``fastvit.patch``
    replaced would return. Eager attention returns them; SDPA, flash-attn and flex attention return
    None (the unpatched model's ``attentions`` is then empty), and so does fastvit's, without
    running eager. A module switched to "fastvit" by hand (no previous value) counts as eager."""
    if not returns_weights(vars(module).get(PREVIOUS_IMPLEMENTATION)):
        return False
    config = getattr(module, "config", None)
    requested = kwargs.get("output_attentions", getattr(config, "output_attentions", False))
    return bool(requested) or capturing_attentions()


def fallback_reason(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict,
) -> tuple[str, str] | None:
    """Why this call cannot run fastvit's op: ``(reason, "eager" | "sdpa")``, or None if it can.

    Args:
        module: the attention module calling the interface.
        query: (B, H, N, D); key: (B, Hkv, M, D); value: (B, Hkv, M, Dv).
        attention_mask: what the model passes (None, a tensor, or something else such as a
            flex ``BlockMask`` of another implementation).
        dropout: the attention dropout the module asks for (0 outside training).
        kwargs: the remaining keyword arguments of the call.
    """
    if _wants_weights(module, kwargs):
        return "the attention weights requested (output_attentions=True)", "eager"
    if kwargs.get("softcap") is not None:
        return "logit softcapping", "eager"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)", "eager"
    if dropout > 0.0:
        return f"attention dropout p={dropout} in training", "sdpa"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} != query head dim {query.shape[-1]}", "sdpa"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return f"an attention mask of type {type(attention_mask).__name__}", "sdpa"
    if any(t.stride(-1) != 1 for t in (query, key, value)):  # SDPA reads them; the kernels need a unit stride
        # Florence-2's channel attention: its "head dim" is the image's tokens, a strided view (and
        # mostly beyond the kernels' head dims); a copy for the kernels would cost what SDPA saves
        return "a query, key or value whose head dim is strided (not contiguous)", "sdpa"
    return None


def _fallback(
    module: nn.Module,
    reason: str,
    route: str,
    args: tuple,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    eager = _eager_of(module) if route == "eager" else None
    target = eager or sdpa_attention_forward
    name = "its eager attention" if eager is not None else "transformers' sdpa attention"
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", NAME)  # or PACKED_NAME
    warn_fallback(
        f"hf-attention:{reason}:{type(module).__qualname__}",
        f"fastvit: {type(module).__name__} (attn_implementation='{implementation}') runs {name} for calls with "
        f"{reason}; fastvit.flash_attention does not cover them",
    )
    if eager is not None:  # the eager functions take no is_causal (the mask carries causality)
        module, query, key, value, mask = args
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # they need it given
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if mask is None and is_causal and query.shape[2] > 1:  # SDPA's mask skipped causality: spell it out
            mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:  # they add the mask: make it additive
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        return target(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return target(*args, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def _varlen(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, causal: bool, kwargs: dict
) -> torch.Tensor:
    """flash-attn's packed layout: (B, H, T, D) with B*T tokens split by ``cu_seq_lens_q``; -> (B, T, H, D)."""
    batch, heads, tokens, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * tokens, heads, head_dim)  # (B*T, H, D), B is 1 when packed
    k = key.transpose(1, 2).reshape(-1, heads, head_dim)
    v = value.transpose(1, 2).reshape(-1, heads, head_dim)
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    out = fastvit.flash_attention_varlen(
        q, k, v, cu_q.to(torch.int32), None if cu_k is None else cu_k.to(torch.int32),
        max_seqlen_q=None if max_q is None else int(max_q), max_seqlen_k=None if max_k is None else int(max_k),
        scale=scale, causal=causal,
    )  # fmt: skip
    return out.view(batch, tokens, heads, head_dim)


def _pop_packed(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Take flash-attn's packing arguments out of ``kwargs`` (the fallbacks get none of them):
    ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (the queries' when not given); the max lengths dropped."""
    cu_q = kwargs.pop("cu_seq_lens_q")
    cu_k = kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    return cu_q, cu_q if cu_k is None else cu_k


def _packed_as_mask(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, causal: bool, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn's packed call as a dense one over the same tokens: q, k, v as (1, H, B*T, D) and a
    bool (1, 1, B*T, B*S) mask that keeps each token in its own sequence of ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (causal: key position <= query position within the sequence, as
    ``flash_attention_varlen``), combined with ``mask`` if the model passed one as well. For the
    calls the op does not cover (weights requested, dropout ...): the fallback then computes what
    the unpacked model computes per image (Pixtral builds this very mask itself)."""
    packed = [t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1]) for t in (query, key, value)]
    cu_q, cu_k = _pop_packed(kwargs)

    def sequence_and_position(cu: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        cu = cu.to(device=query.device, dtype=torch.long)
        index = torch.arange(tokens, device=query.device)
        sequence = torch.bucketize(index, cu[1:], right=True)  # tokens past cu[-1]: a sequence of their own
        return sequence, index - torch.cat([cu, cu[-1:]])[sequence]

    seq_q, pos_q = sequence_and_position(cu_q, packed[0].shape[2])
    seq_k, pos_k = sequence_and_position(cu_k, packed[1].shape[2])
    allowed = seq_q[:, None] == seq_k[None, :]
    if causal:
        allowed &= pos_k[None, :] <= pos_q[:, None]
    allowed = allowed[None, None]
    if mask is not None:  # SDPA's conventions: bool True = attend, float added to the scores
        if query.shape[0] != 1 and mask.shape[0] != 1:
            raise ValueError(
                f"a per-batch attention mask {tuple(mask.shape)} with packed sequences (cu_seq_lens_q) "
                f"and batch {query.shape[0]}: flash-attn's packed layout has batch 1"
            )
        allowed = allowed & mask if mask.dtype == torch.bool else mask.masked_fill(~allowed, float("-inf"))
    return *packed, allowed


def _per_sequence(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """A packed call (batch 1) as the module's own non-flash branch makes it: one call per sequence
    of ``cu_seq_lens_q`` / ``cu_seq_lens_k``, each running what the op does not cover by itself
    (weights, dropout); outputs concatenated over the tokens, weights as the list of each
    sequence's (1, H, L, S), as those branches collect them (the Qwen-VL attentions drop them)."""
    cu_q, cu_k = _pop_packed(kwargs)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs, weights = [], []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k), strict=True):
        out, weight = fastvit_attention_forward(
            module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], None, dropout, scaling, is_causal,
            **kwargs,
        )  # fmt: skip
        outs.append(out)
        weights.append(weight)
    return torch.cat(outs, dim=1), None if all(w is None for w in weights) else weights


def fastvit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract, computed by ``fastvit.flash_attention``.

    Called by the model's attention module as ``ALL_ATTENTION_FUNCTIONS["fastvit"]``; the
    conventions are ``sdpa_attention_forward``'s (transformers/integrations/sdpa_attention.py).

    Args:
        module: the calling attention module (``num_key_value_groups`` and ``is_causal`` are read
            from it, ``config.output_attentions`` too).
        query: (B, H, N, D).
        key, value: (B, Hkv, M, D), H a multiple of Hkv (grouped-query attention repeats them).
        attention_mask: None, or a bool (True = attend) or additive float mask broadcastable to
            (B, H, N, M), e.g. (B, 1, N, M) from ``AttentionMaskInterface["fastvit"]`` (SDPA's) or a
            bias the model builds itself (BEiT, Swin: relative position bias plus window mask).
        dropout: attention dropout probability (the module passes 0 outside training).
        scaling: multiplies q.k; None: 1/sqrt(D).
        is_causal: None: ``module.is_causal``. Causal only without a mask and with N > 1, as SDPA.
        position_bias: an additive (B|1, H, N, M) bias (T5-style), combined with the mask as SDPA
            does.
        **kwargs: ``output_attentions``, flash-attn's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
            ``max_length_q`` / ``max_length_k`` (then ``fastvit.flash_attention_varlen`` runs
            over the packed sequences), and what the model passes along (ignored).

    Returns:
        ``(attn_output, None)``, attn_output (B, N, H, D) contiguous; ``(attn_output,
        attn_weights)`` from the eager fallback when weights are requested.

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> import fastvit  # registers "fastvit" once transformers is imported
        >>> model = CLIPVisionModel(CLIPVisionConfig(attn_implementation="fastvit"))
        >>> model.set_attn_implementation("fastvit")  # or switch an existing model
    """
    packed = kwargs.get("cu_seq_lens_q") is not None  # flash-attn's layout (PACKED_NAME, or a caller's)
    reason = fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    per_sequence = packed and reason is not None and attention_mask is None and query.shape[0] == 1
    if per_sequence and packs_for_flash(type(module)):  # as its own non-flash branch: a call per image
        return _per_sequence(module, query, key, value, dropout, scaling, is_causal, kwargs)
    if packed and (reason is not None or attention_mask is not None):  # one dense call, masked per sequence
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        batch, tokens = query.shape[0], query.shape[2]
        query, key, value, attention_mask = _packed_as_mask(query, key, value, attention_mask, causal, kwargs)
        out, weights = fastvit_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, False, position_bias, **kwargs
        )
        return out.reshape(batch, tokens, *out.shape[2:]), weights
    if reason is not None:
        args = (module, query, key, value, attention_mask)
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return _fallback(module, *reason, args, dropout, scaling, is_causal, kwargs)

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # the kernels take as many key/value heads as query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # SDPA's rule (causal without a mask and with more than one query), the length tested in an ``if``:
    # under torch.compile's dynamic shapes it is symbolic, and ``q_length > 1 and ...`` handed the op
    # a SymBool (SDPA rejects one); a branch makes dynamo guard on it and keeps the flag a bool
    is_causal = bool(is_causal) and attention_mask is None
    if is_causal and q_length <= 1:
        is_causal = False
    if packed:  # flash-attn's packed sequences: one varlen launch
        return _varlen(query, key, value, scaling, is_causal, kwargs), None
    if is_causal and kv_length > q_length:  # prefill into an empty static cache, as SDPA crops it
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        position_bias = None if position_bias is None else position_bias[..., :q_length]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    out = fastvit.flash_attention(query, key, value, scale=scaling, causal=is_causal, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None  # (B, N, H, D): the kernels write it so (no copy)


def _accept_packed_name() -> None:
    """Let transformers build and switch models whose configs hold ``PACKED_NAME``.

    ``PreTrainedModel._check_and_adjust_attn_implementation`` (run by ``Model(config)``,
    ``from_pretrained``, ``from_config`` and ``set_attn_implementation``, for every sub-model) sends
    a name holding "flash" to its flash-attn loader, which finds no package or Hub kernel of that
    name and raises: a patched model's config could not build another model (an EMA copy,
    ``type(model)(model.config)``). The check is wrapped once to return ``PACKED_NAME`` as it is
    (a registered function, as ``"fastvit"``); every other name goes through transformers' check.
    """
    from transformers.modeling_utils import PreTrainedModel

    check = PreTrainedModel._check_and_adjust_attn_implementation
    if getattr(check, "_fastvit_accepts", None) == PACKED_NAME:
        return

    @functools.wraps(check)
    def check_and_adjust(self, attn_implementation, *args, **kwargs):
        if attn_implementation == PACKED_NAME:
            return attn_implementation
        return check(self, attn_implementation, *args, **kwargs)

    check_and_adjust._fastvit_accepts = PACKED_NAME
    PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust


def fastvit_mask(*, config: PretrainedConfig | None = None, **kwargs) -> torch.Tensor | None:
    """The attention mask transformers builds for a config on ``"fastvit"``
    (``AttentionMaskInterface["fastvit"]``, called with the arguments of ``sdpa_mask``).

    SDPA's bool mask (True = attend; None when nothing is masked), except on a config
    ``fastvit.patch`` switched from eager attention: an additive float mask as eager's (0 = attend),
    which the unpatched model built. Models that add their own bias to the mask (BEiT,
    data2vec-vision: ``bias + attention_mask``) turned a bool mask into +1 / 0, giving padded keys
    weight; a causal text tower's padded rows averaged v under eager and not under SDPA. Its masked
    value is a quarter of eager's ``finfo(dtype).min``: still far below any score (a partly masked
    row weighs its masked keys 0, a row masked throughout averages v, as eager), and finite in the
    kernels' base-2 scores, where eager's own value overflows to -inf and such a row gets 0.

    Example:
        >>> fastvit_mask(batch_size=1, q_length=2, kv_length=2, attention_mask=torch.tensor([[1, 0]]),
        ...              mask_function=lambda b, h, q, kv: torch.ones((), dtype=torch.bool)).shape
        torch.Size([1, 1, 2, 2])
    """
    name = getattr(config, "_attn_implementation", None)
    eager = isinstance(name, RoutedName) and name.previous == "eager"
    dtype = kwargs.pop("dtype", torch.float32)
    if eager:  # as eager_mask: causality is in the mask, never left to is_causal
        kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(config=config, **kwargs)
    if not eager or mask is None:
        return mask
    # eager_mask's torch.where(mask, 0, finfo.min), with the masked value a quarter of it
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min / 4)


def _output_attentions_allowed(config: PretrainedConfig, value: bool) -> bool:
    """Whether ``output_attentions = value`` on a config routed to fastvit is what the unpatched
    model allowed: transformers allows it only under eager attention; a config ``fastvit.patch``
    switched from eager (or one set to "fastvit" by hand, whose calls asking for weights run eager
    attention, ``_wants_weights``) returns the weights as before. Switched from SDPA, flash-attn or
    flex: transformers' error, as unpatched."""
    name = config._attn_implementation
    return bool(value) and name in (NAME, PACKED_NAME) and returns_weights(getattr(name, "previous", None))


def _accept_output_attentions() -> None:
    """Let ``config.output_attentions = True`` (and transformers' ``validate_output_attentions``)
    pass on the configs ``_output_attentions_allowed`` names: transformers' setter raises for every
    implementation but "eager", so a model patched over eager attention refused what it accepted
    unpatched (transformers' own test_attention_outputs failed patched). Wrapped once; every other
    config goes through transformers' code."""
    setter = vars(PretrainedConfig)["output_attentions"]
    if getattr(setter.fset, "_fastvit_accepts", False):
        return

    @functools.wraps(setter.fset)
    def set_output_attentions(self, value: bool) -> None:
        if _output_attentions_allowed(self, value):
            self._output_attentions = value  # what transformers' setter stores under eager
            return
        setter.fset(self, value)

    validate = PretrainedConfig.validate_output_attentions

    @functools.wraps(validate)
    def validate_output_attentions(self) -> None:
        if not _output_attentions_allowed(self, self.output_attentions):
            validate(self)

    set_output_attentions._fastvit_accepts = True
    PretrainedConfig.output_attentions = property(setter.fget, set_output_attentions, setter.fdel, setter.__doc__)
    PretrainedConfig.validate_output_attentions = validate_output_attentions
    # huggingface_hub's @strict lists each config class's validators when the class is defined
    # (config.validate(), which save_pretrained runs): the classes defined already list the original
    classes = [PretrainedConfig]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        listed = vars(cls).get("__class_validators__")
        if isinstance(listed, list):
            listed[:] = [validate_output_attentions if v is validate else v for v in listed]


def register() -> None:
    """Register ``"fastvit"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Runs by itself when transformers' ``modeling_utils`` is imported; call it directly
    only after removing the registration (tests) or to re-register over another ``"fastvit"``.

    Example:
        >>> register()
        >>> model = AutoModel.from_pretrained("facebook/dinov2-base", attn_implementation="fastvit")
    """
    # imported here: importing transformers.modeling_utils is what runs the registration hook
    from transformers.modeling_utils import AttentionInterface

    for name in (NAME, PACKED_NAME):
        AttentionInterface.register(name, fastvit_attention_forward)
    AttentionMaskInterface.register(NAME, fastvit_mask)
    AttentionMaskInterface.register(PACKED_NAME, sdpa_mask)  # the packing towers' own masks: SDPA's
    _accept_packed_name()
    _accept_output_attentions()
