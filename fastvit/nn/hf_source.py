"""What a Hugging Face module's source says about how it calls its attention (transformers' own
heuristic for ``set_attn_implementation``: reading ``forward``'s source). No transformers import:
``fastvit.patching.transformers`` needs these where ``fastvit.nn.hf_attention`` cannot import (a
transformers without the attention interface).
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["calls_interface", "forward_source", "packs_for_flash"]


@functools.cache
def forward_source(cls: type) -> str:
    """The source of ``cls.forward``, or "" where there is none (a REPL class, a C function)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def calls_interface(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in transformers' interface by
    ``config._attn_implementation``.

    Example:
        >>> calls_interface(transformers.models.clip.modeling_clip.CLIPAttention)
        True
    """
    source = forward_source(cls)
    return "ALL_ATTENTION_FUNCTIONS" in source and "_attn_implementation" in source


def packs_for_flash(cls: type) -> bool:
    """Whether ``cls.forward`` passes flash-attn's packed ``cu_seq_lens_q`` when the implementation's
    name says flash (``is_flash_attention_requested``), and otherwise splits the packed images
    itself (the Qwen-VL / GLM-4V / Kimi / PaddleOCR-VL vision attentions) or masks them (Pixtral's
    model).

    Example:
        >>> packs_for_flash(transformers.models.qwen2_vl.modeling_qwen2_vl.VisionAttention)
        True
    """
    source = forward_source(cls)
    return "is_flash_attention_requested" in source and "cu_seq_lens_q" in source
