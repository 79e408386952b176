"""Fake (meta) implementations of the extension's ops (``torch.ops.fastvit_C``): the shapes and
dtypes exactly as the C++ ops return them, so ``torch.compile``, ``torch.export`` and meta tensors
trace the ``cuda`` route. Registered by ``fastvit.extension`` once the library is loaded (an op
must exist before a fake can be registered for it).
"""

from __future__ import annotations

import torch

__all__ = ["register"]

_fakes_registered = False


def _empty0(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


def register() -> None:
    """Register every fake implementation (once; the extension's ops must be loaded)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    fake = torch.library.register_fake

    @fake("fastvit_C::layer_norm_fwd")
    def _(x, weight, bias, eps, out_dtype):
        rows, dim = x.shape
        return (
            x.new_empty((rows, dim), dtype=out_dtype),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32),
        )

    @fake("fastvit_C::layer_norm_bwd")
    def _(grad_y, x, weight, mean, rstd, output_mask, residual_grad=None):
        param_dtype = x.dtype if weight is None else weight.dtype
        dim = x.shape[1]
        return (
            x.new_empty(x.shape) if output_mask[0] else _empty0(x, x.dtype),
            x.new_empty((dim,), dtype=param_dtype) if output_mask[1] else _empty0(x, param_dtype),
            x.new_empty((dim,), dtype=param_dtype) if output_mask[2] else _empty0(x, param_dtype),
        )

    @fake("fastvit_C::bias_gelu_fwd")
    def _(pre, bias, approximate):
        return pre.new_empty(pre.shape)

    @fake("fastvit_C::bias_gelu_bwd")
    def _(grad, pre, bias, approximate):
        return pre.new_empty(pre.shape)

    @fake("fastvit_C::scaled_residual")
    def _(branch, residual, layer_scale, sample_scale, rows_per_sample, out_dtype):
        return branch.new_empty(branch.shape, dtype=out_dtype)

    @fake("fastvit_C::patchify")
    def _(x, patch, out_dtype):
        batch, chans, height, width = x.shape
        return x.new_empty((batch * (height // patch) * (width // patch), chans * patch * patch), dtype=out_dtype)

    @fake("fastvit_C::unpatchify")
    def _(cols, image_size, patch, out_dtype):
        return cols.new_empty(tuple(image_size), dtype=out_dtype)

    @fake("fastvit_C::layernorm_mlp_fwd")
    def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale, eps,
          approximate, residual, out_dtype, save_for_backward):
        batch, tokens, dim = x.shape
        rows, gemm = batch * tokens, fc1_weight.dtype
        keep_branch = save_for_backward and (layer_scale is not None or sample_scale is not None)
        return (
            x.new_empty((batch, tokens, dim), dtype=out_dtype),
            x.new_empty((rows, fc1_weight.shape[0]), dtype=gemm) if save_for_backward else _empty0(x, gemm),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows, dim), dtype=gemm) if keep_branch else _empty0(x, gemm),
        )

    @fake("fastvit_C::layernorm_mlp_bwd")
    def _(grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
          sample_scale, preact, mean, rstd, branch, eps, approximate, residual, needs):
        inputs = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale)
        return [
            _empty0(x, x.dtype) if t is None else (x.new_empty(t.shape, dtype=t.dtype) if need else _empty0(x, t.dtype))
            for t, need in zip(inputs, needs, strict=True)
        ]

    @fake("fastvit_C::patch_embed_fwd")
    def _(x, weight, bias, pos_embed, prefix_tokens):
        batch, _, height, width = x.shape
        dim, patch = weight.shape[0], weight.shape[-1]
        num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
        dtype = next((t.dtype for t in (pos_embed, prefix_tokens) if t is not None), weight.dtype)
        return x.new_empty((batch, num_prefix + (height // patch) * (width // patch), dim), dtype=dtype)

    @fake("fastvit_C::patch_embed_bwd")
    def _(grad, x, weight, num_prefix, pos_embed_len, needs):
        dim, f32 = weight.shape[0], torch.float32
        return [
            x.new_empty(x.shape) if needs[0] else _empty0(x, x.dtype),
            x.new_empty(weight.shape, dtype=weight.dtype) if needs[1] else _empty0(x, weight.dtype),
            x.new_empty((dim,), dtype=f32) if needs[2] else _empty0(x, f32),
            x.new_empty((1, pos_embed_len, dim), dtype=f32) if needs[3] else _empty0(x, f32),
            x.new_empty((1, num_prefix, dim), dtype=f32) if needs[4] else _empty0(x, f32),
        ]


def _ops_loaded() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("fastvit_C::layer_norm_fwd", "")
    except RuntimeError:
        return False
    return True


# the library names this module as its ops' Python module (csrc/ops.cpp: set_python_module), so
# torch imports it when it first needs a fake: the fakes are registered on that import too
if _ops_loaded():
    register()
