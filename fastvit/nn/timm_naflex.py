"""timm's ``NaFlexVit`` (SigLIP-2 NaFlex, NaViT-style variable resolution) with its embedding on
``fastvit.patch_embed`` and a key-padding attention mask, swapped onto a model by ``fastvit.patch``.

NaFlexVit's blocks are timm's ``Block`` / ``EvaBlock``: their attention and MLP halves are fused by
``fastvit.nn.timm_vit`` / ``timm_eva`` like any other. This module fuses what is NaFlex's own, in
``NaFlexVit._forward_embeds`` (so ``forward_features``, ``forward`` and ``forward_intermediates``
all use it; ``model.embeds`` itself is untouched and keeps its meaning):

- **Image input** (B, C, H, W): ``NaFlexEmbeds`` is patchify + ``Linear`` over each patch flattened
  in (p, p, C) order (or (C, p, p); or a ``Conv2d``), the position embedding (``learned`` table
  resampled to the grid, or ``factorized`` rows + columns) on the patches, then the class / register
  tokens. That is one ``fastvit.patch_embed`` call: the Linear weight (D, p*p*C) is handed over as a
  permuted *view* (D, C, p, p) (no copy of the Parameter: the kernels read it in its own (p, p, C)
  order for channels_last images; for NCHW images they reorder it once per call, D*p*p*C elements,
  the weight's size, never the image's), the position embedding as (1, N, D) added to the patches only, the tokens as
  ``prefix_tokens``. timm's batch_patchify copy, its in-place adds and its ``torch.cat`` are gone.
- **Pre-patchified NaFlex input** (B, L, p*p*C) with ``patch_coord`` / ``patch_valid``: the patches
  of (p, p, C) layout *are* a channels_last image of L patches stacked vertically, (B, C, L*p, p)
  with strides (L*p*p*C, 1, p*C, C): a view, no copy. The projection and the prefix tokens are one
  ``fastvit.patch_embed`` call on that view; the per-sample position embedding (each sample's grid
  from ``patch_coord``, the table interpolated per grid size or ``grid_sample``d per patch) is a
  data-dependent gather with no fastvit op: timm's own code adds it, in place, to the patch rows.
- **Masks**: timm turns ``patch_valid`` into a symmetric additive mask (B, 1, N, N) (query and key
  both valid), materialised once per forward and read by every block's attention. Padded queries
  feed nothing valid (their keys are masked for every valid query, the MLP is per token, pooling
  masks them), so the cheapest mask with the same valid-token outputs is the key-padding one,
  (B, 1, 1, N), which the attention op broadcasts over heads and queries (stride 0): timm's own
  ``create_attention_mask(symmetric=False, q_len=1)``, i.e. what ``use_key_only_attn_mask=True``
  builds. Only the padded rows' own outputs change (timm averages every value there; they now attend
  to the valid keys), and a loss that reads padded rows would see that. A mask passed by the caller
  is used as given. Varlen (``fastvit.flash_attention_varlen``) was not chosen: it needs each
  sample's valid tokens contiguous (patch_valid may be any pattern; patch dropout reorders), a
  gather of q/k/v and a scatter of the output in every block (timm's blocks take (B, N, C)) and
  the packed lengths on the host (a sync that breaks compiled graphs), to save the padded fraction
  of one op's FLOPs.

Left to timm's code at call time: ``(B, L, p, p, C)`` input through the patch-size interpolator,
(C, p, p) patch layout on pre-patchified input (no strided view exists), images whose size is not
a multiple of the patch without ``dynamic_img_pad`` for a Linear projection (timm's error; its
conv drops the partial patch, which the fused call crops away as a view). A hook
on ``embeds`` or its ``proj`` / ``norm``, or a replaced one, runs timm's ``_forward_embeds``.
Importing this module imports timm's ``naflexvit`` (a timm without it: the adapter leaves
NaFlexVit unknown).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
from timm.layers import apply_keep_indices_nlc
from timm.models.naflexvit import NaFlexEmbeds, NaFlexVit, create_attention_mask

import fastvit
from fastvit.nn.fused import FusedModule, conv_takes
from fastvit.ops.patch_embed import crop_to_patches

__all__ = ["FusedNaFlexVit", "embed_notes", "embed_problems", "key_padding_mask"]

# what FusedNaFlexVit reads on the model and on its NaFlexEmbeds (another timm version may lack some)
_MODEL_ATTRIBUTES = ("embeds", "rope", "rope_is_mixed", "patch_drop", "norm_pre", "num_prefix_tokens",
                     "_forward_embeds", "_generate_rope_naflex")  # fmt: skip
_EMBED_ATTRIBUTES = (
    "proj", "norm", "norm_input", "pos_drop", "is_linear", "channels_last", "patch_size", "in_chans",
    "dynamic_img_pad", "enable_patch_interpolator", "pos_embed_type", "pos_embed", "cls_token", "reg_token",
    "pos_embed_use_grid_sample", "_apply_learned_pos_embed", "_apply_factorized_pos_embed",
    "_apply_learned_naflex_pos_embed", "_apply_learned_naflex_pos_embed_grid_sample",
    "_apply_factorized_naflex_pos_embed", "_apply_factorized_naflex_pos_embed_grid_sample",
)  # fmt: skip


def key_padding_mask(patch_valid: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, 1, P+N) additive key-padding mask of ``patch_valid`` (B, N), prefix tokens valid.

    timm's own ``create_attention_mask(..., symmetric=False, q_len=1)``: 0 where a key may be
    attended, ``finfo(dtype).min`` where it is padding (an additive mask, since timm's eager
    attention adds it to the scores). Broadcast over heads and queries by the attention op.
    """
    return create_attention_mask(patch_valid, num_prefix_tokens=num_prefix_tokens, symmetric=False, q_len=1,
                                 dtype=dtype)  # fmt: skip


def _missing(module: nn.Module, names: tuple[str, ...], where: str) -> list[str]:
    missing = [n for n in names if not hasattr(module, n)]
    if not missing:
        return []
    return [f"{where} has no {', '.join(missing)} (a timm version fastvit does not know)"]


def embed_problems(model: nn.Module) -> list[str]:
    """Why ``model``'s NaFlex embedding cannot run ``fastvit.patch_embed`` (empty: it can)."""
    problems = _missing(model, _MODEL_ATTRIBUTES, type(model).__qualname__)
    if problems:
        return problems
    embeds = model.embeds
    if type(embeds) is not NaFlexEmbeds:
        return [f"embeds is {type(embeds).__qualname__}, not timm's NaFlexEmbeds"]
    problems = _missing(embeds, _EMBED_ATTRIBUTES, "embeds")
    if problems:
        return problems
    proj, (patch_h, patch_w) = embeds.proj, embeds.patch_size
    if patch_h != patch_w:
        problems.append(f"embeds.patch_size is {embeds.patch_size}; fastvit.patch_embed takes square patches")
    if embeds.is_linear:
        if type(proj) is not nn.Linear:
            problems.append(f"embeds.proj is {type(proj).__qualname__}, not nn.Linear")
        elif proj.in_features != patch_h * patch_w * embeds.in_chans:
            problems.append(f"embeds.proj takes {proj.in_features} features, not p*p*C")
    elif type(proj) is not nn.Conv2d:
        problems.append(f"embeds.proj is {type(proj).__qualname__}, not nn.Conv2d")
    elif (
        tuple(proj.stride) != tuple(proj.kernel_size)
        or proj.padding not in ((0, 0), "valid")
        or tuple(proj.dilation) != (1, 1)
        or proj.groups != 1
    ):
        problems.append(f"embeds.proj has kernel {proj.kernel_size}, stride {proj.stride}, padding {proj.padding}, "
                        f"dilation {proj.dilation}, groups {proj.groups}: not a patchify conv")  # fmt: skip
    if embeds.norm_input is not None:
        problems.append(
            f"embeds.norm_input is {type(embeds.norm_input).__qualname__} (a norm over each patch vector before "
            "the projection); fastvit.patch_embed projects the pixels as they are"
        )
    if type(embeds.norm) is not nn.Identity:
        problems.append(
            f"embeds.norm is {type(embeds.norm).__qualname__} (a norm between the projection and the position "
            "embedding); fastvit.patch_embed adds pos_embed to the projection"
        )
    if embeds.pos_embed_type not in ("learned", "factorized", "none"):
        problems.append(f"embeds.pos_embed_type {embeds.pos_embed_type!r} is not one fastvit knows")
    return problems


def embed_notes(model: nn.Module) -> list[str]:
    """What the report says about a fused NaFlexVit: the paths its inputs take and its mask."""
    embeds = model.embeds
    weight = "the Linear's weight as a (D, C, p, p) view" if embeds.is_linear else "the Conv2d's weight"
    notes = [f"image input: one fastvit.patch_embed call ({weight}, {embeds.pos_embed_type} pos_embed)"]
    if embeds.is_linear and embeds.channels_last:
        notes.append("pre-patchified input: projection and prefix tokens in fastvit.patch_embed over a strided "
                     "view of the patches, then timm's per-sample pos_embed lookup (no fastvit op for it)")  # fmt: skip
    elif embeds.is_linear:
        notes.append("pre-patchified input runs timm's embeds: (C, p, p) patches have no strided image view")
    if embeds.enable_patch_interpolator:
        notes.append("(B, L, p, p, C) input through the patch-size interpolator runs timm's embeds")
    notes.append("padding mask: key-only (B, 1, 1, N), not timm's (B, 1, N, N); padded tokens' own outputs differ")
    return notes


class FusedNaFlexVit(FusedModule, NaFlexVit):
    """timm ``NaFlexVit`` whose ``_forward_embeds`` embeds with ``fastvit.patch_embed`` and masks
    padding with a (B, 1, 1, N) key-padding mask (see the module docstring). Everything else
    (RoPE, patch dropout, ``norm_pre``, the blocks, pooling) runs as timm's."""

    fastvit_part = "patch_embed"
    fastvit_op = "patch_embed"
    fastvit_bypassed = ("embeds", "embeds.proj", "embeds.norm")

    def _fastvit_weight(self) -> torch.Tensor:
        """The projection as a (D, C, p, p) conv weight: the Conv2d's, or a view of the Linear's."""
        embeds = self.embeds
        weight = embeds.proj.weight
        if not embeds.is_linear:
            return weight
        patch, chans = embeds.patch_size[0], embeds.in_chans
        if embeds.channels_last:  # (D, p*p*C) -> (D, p, p, C) -> (D, C, p, p), strided
            return weight.unflatten(1, (patch, patch, chans)).permute(0, 3, 1, 2)
        return weight.unflatten(1, (chans, patch, patch))

    def _fastvit_prefix(self) -> torch.Tensor | None:
        """Class then register tokens (1, P, D), or None."""
        prefix = [t for t in (self.embeds.cls_token, self.embeds.reg_token) if t is not None]
        return None if not prefix else prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)

    def _fastvit_pos_embed(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """The (1, gh*gw, D) position embedding of the patches of a grid, in ``dtype`` (the
        projection's): the learned table as it is (a view) on its own grid, else timm's resampling
        (``_apply_learned_pos_embed`` / ``_apply_factorized_pos_embed``) added to zeros."""
        embeds = self.embeds
        if embeds.pos_embed_type == "none":
            return None
        if embeds.pos_embed_type == "learned" and tuple(embeds.pos_embed.shape[1:3]) == grid:
            return embeds.pos_embed.flatten(1, 2).to(dtype)
        pos = torch.zeros(1, grid[0] * grid[1], embeds.embed_dim, dtype=dtype, device=embeds.proj.weight.device)
        if embeds.pos_embed_type == "learned":
            embeds._apply_learned_pos_embed(pos, grid_size=list(grid))
        else:
            embeds._apply_factorized_pos_embed(pos, grid_size=list(grid))
        return pos

    def _fastvit_image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(B, C, H, W) -> (B, P+N, D) tokens and the (gh, gw) grid, or None for timm's path."""
        embeds = self.embeds
        patch = embeds.patch_size[0]
        pad = embeds.dynamic_img_pad
        partial = x.ndim == 4 and not pad and (x.shape[-2] % patch or x.shape[-1] % patch)
        takes = x.ndim == 4 and x.shape[1] == embeds.in_chans and conv_takes(x, embeds.proj)
        if not takes or (partial and embeds.is_linear):
            return None  # timm's asserts, or its projection's error (a partial patch, other channels or dtype)
        if partial:  # timm's conv drops the partial patch's rows and columns (a view here)
            x = crop_to_patches(x, patch)
        grid = (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))
        weight = embeds.proj.weight
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        padding = {"dynamic_img_pad": True} if pad else {}  # zero-pads bottom/right, in the kernel
        tokens = fastvit.patch_embed(
            x, self._fastvit_weight(), embeds.proj.bias, pos_embed=self._fastvit_pos_embed(grid, dtype),
            prefix_tokens=self._fastvit_prefix(), **padding,
        )  # fmt: skip
        return tokens, grid

    def _fastvit_patch_tokens(self, x: torch.Tensor, patch_coord: torch.Tensor) -> torch.Tensor | None:
        """(B, L, p*p*C) patches -> (B, P+L, D) tokens, or None for timm's path."""
        embeds = self.embeds
        patch, chans = embeds.patch_size[0], embeds.in_chans
        if (
            not (embeds.is_linear and embeds.channels_last)
            or x.ndim != 3
            or x.shape[-1] != patch * patch * chans
            or not conv_takes(x, embeds.proj)  # another dtype: its Linear's error
        ):
            return None  # (C, p, p) layout, the patch-size interpolator's 5-D input, or timm's error
        # (B, L, p*p*C) -> (B, L, p, p, C) -> (B, C, L, p, p) -> (B, C, L*p, p): patch l is rows
        # l*p ... l*p + p-1 of a channels_last image, a view when x's patches are laid out densely
        image = x.unflatten(2, (patch, patch, chans)).permute(0, 4, 1, 2, 3).flatten(2, 3)
        tokens = fastvit.patch_embed(image, self._fastvit_weight(), embeds.proj.bias,
                                     prefix_tokens=self._fastvit_prefix())  # fmt: skip
        patches = tokens[:, tokens.shape[1] - x.shape[1] :]  # the patch rows, a view
        if embeds.pos_embed_type == "learned":  # timm's per-sample position embedding, in place
            if embeds.pos_embed_use_grid_sample:
                embeds._apply_learned_naflex_pos_embed_grid_sample(patches, patch_coord=patch_coord)
            else:
                embeds._apply_learned_naflex_pos_embed(patches, patch_coord=patch_coord)
        elif embeds.pos_embed_type == "factorized":
            if embeds.pos_embed_use_grid_sample:
                embeds._apply_factorized_naflex_pos_embed_grid_sample(patches, patch_coord=patch_coord)
            else:
                embeds._apply_factorized_naflex_pos_embed(patches, patch_coord=patch_coord)
        return tokens

    def _fastvit_embeds(
        self, x: torch.Tensor, patch_coord: torch.Tensor | None, patch_valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """What ``self.embeds(x, patch_coord, patch_valid)`` returns: (tokens, grid or None)."""
        if any(isinstance(t, torch.fx.Proxy) for t in (x, patch_coord, patch_valid)):
            # torch.fx: timm's tracer keeps NaFlexEmbeds a leaf (one node, as in the unpatched graph);
            # the fused embedding chooses on shapes and on patch_coord, which a traced graph fixes
            return self.embeds(x, patch_coord=patch_coord, patch_valid=patch_valid)
        if patch_coord is None or not self.embeds.is_linear:  # images (a conv embeds ignores patch_coord)
            fused = self._fastvit_image_tokens(x)
            if fused is not None:
                tokens, grid = fused
                return self.embeds.pos_drop(tokens), grid
        else:
            tokens = self._fastvit_patch_tokens(x, patch_coord)
            if tokens is not None:
                return self.embeds.pos_drop(tokens), None
        return self.embeds(x, patch_coord=patch_coord, patch_valid=patch_valid)

    def _forward_embeds(
        self,
        x: torch.Tensor,
        patch_coord: torch.Tensor | None,
        patch_valid: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        """timm's ``NaFlexVit._forward_embeds`` (embedding, RoPE, patch dropout, mask, ``norm_pre``)
        with the fused embedding and the key-padding mask."""
        if not self._fastvit_intact():
            return super()._forward_embeds(x, patch_coord, patch_valid, attn_mask)
        naflex_mode = patch_coord is not None
        x, grid_size = self._fastvit_embeds(x, patch_coord, patch_valid)

        rope_embeds = None  # timm's, line for line
        if self.rope is not None:
            if patch_coord is not None:
                rope_embeds = self._generate_rope_naflex(x, patch_coord)
            elif grid_size is not None:
                rope_embeds = self.rope.get_embed(shape=grid_size)
            else:
                raise AssertionError("Expected one of patch_coord or grid_size to be valid")

        keep_indices: torch.Tensor | None = None
        if self.training and self.patch_drop is not None:
            x, keep_indices = self.patch_drop(x)
            if patch_valid is not None:
                patch_valid = patch_valid.gather(1, keep_indices)
            if rope_embeds is not None and not self.rope_is_mixed:
                rope_embeds = apply_keep_indices_nlc(x, rope_embeds, keep_indices, pos_embed_has_batch=naflex_mode)
                if not naflex_mode:
                    rope_embeds = rope_embeds.unsqueeze(1)

        if attn_mask is None and patch_valid is not None:  # after patch dropout, as timm
            attn_mask = key_padding_mask(patch_valid, self.num_prefix_tokens, x.dtype)

        return {
            "patches": self.norm_pre(x),
            "patch_valid": patch_valid,
            "rope_embeds": rope_embeds,
            "attn_mask": attn_mask,
            "keep_indices": keep_indices,
        }
