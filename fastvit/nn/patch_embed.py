"""FusedPatchEmbed: timm's ``PatchEmbed`` (Conv2d, flatten, NCHW -> NLC) with the prefix-token
concat and the position-embedding add of the model fused into the same kernel.

The module holds only the projection ``Conv2d`` -- its own (``proj``, like timm, so checkpoints
load) or a model's existing one (``from_conv``: timm ``PatchEmbed.proj``, torchvision
``conv_proj``, Hugging Face ``ViTPatchEmbeddings.projection``), registered as is, never copied.
Prefix tokens and the position embedding stay owned by the model and are passed in at call time.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvit.backend import current_backend
from fastvit.nn.fused import conv_settings, submodules_called_problem
from fastvit.ops.patch_embed import assemble_tokens, crop_to_patches, pad_to_patches, patch_embed

__all__ = ["FusedPatchEmbed"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


class FusedPatchEmbed(nn.Module):
    """Image to tokens: (B, C, H, W) -> (B, P+N, D) in one kernel (``fastvit.patch_embed``).

    Args:
        img_size: expected (H, W) (an int for square images), or None to accept any size.
        patch_size: p (square patches; a pair must have equal entries).
        in_chans: C.
        embed_dim: D.
        bias: whether the projection has a bias.
        strict_img_size: with ``img_size``, reject images of another size (timm's default).
        dynamic_img_pad: zero-pad H and W up to multiples of p (in the kernel's masks, not a copy).
            Without it, an image whose H or W is not a multiple of p raises ``ValueError``, except
            at a strict ``img_size`` (384 with p = 14), where the partial patch at the bottom and
            right is dropped, as timm's ``PatchEmbed`` (its conv) drops it.
        device, dtype: of the new projection.

    Example:
        >>> embed = fastvit.nn.FusedPatchEmbed(224, 16, 3, 768).cuda()
        >>> cls, pos = torch.zeros(1, 1, 768).cuda(), torch.zeros(1, 197, 768).cuda()
        >>> embed(torch.randn(2, 3, 224, 224).cuda(), pos_embed=pos, prefix_tokens=cls).shape
        torch.Size([2, 197, 768])
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        p, q = _pair(patch_size, "patch_size")
        if p != q:
            raise ValueError(f"FusedPatchEmbed needs square patches, got patch_size {patch_size!r}")
        conv = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias, device=device, dtype=dtype)
        self._setup(conv, "proj", img_size, strict_img_size, dynamic_img_pad)

    def _setup(
        self,
        conv: nn.Conv2d,
        name: str,
        img_size: int | tuple[int, int] | None,
        strict_img_size: bool,
        dynamic_img_pad: bool,
    ) -> None:
        self.conv_name = name
        self.add_module(name, conv)
        # what the fused op computes besides the weight and bias: a patchifier's stride, padding ...
        self.conv_settings = conv_settings(conv)
        self.patch_size = tuple(conv.kernel_size)
        self.in_chans = conv.in_channels
        self.embed_dim = conv.out_channels
        self.img_size = None if img_size is None else _pair(img_size, "img_size")
        sizes = () if self.img_size is None else zip(self.img_size, self.patch_size, strict=True)
        self.grid_size = None if self.img_size is None else tuple(s // p for s, p in sizes)
        self.num_patches = None if self.grid_size is None else self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = bool(strict_img_size)
        self.dynamic_img_pad = bool(dynamic_img_pad)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        name: str = "proj",
        img_size: int | tuple[int, int] | None = None,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ) -> FusedPatchEmbed:
        """Wrap an existing patchifying Conv2d (registered under ``name``, not copied).

        Args:
            conv: a Conv2d with a square kernel, stride = kernel, no padding, no dilation, one
                group (timm ``PatchEmbed.proj``, torchvision ``conv_proj``, Hugging Face
                ``ViTPatchEmbeddings.projection``).
            name: the attribute the conv is registered under, so that ``state_dict`` keys match the
                module this one replaces (``"proj"``, ``"conv_proj"``, ``"projection"``).
            img_size, strict_img_size, dynamic_img_pad: as in the constructor.

        Returns:
            A ``FusedPatchEmbed`` holding ``conv`` itself (same object, same Parameters) as
            ``self.<name>``.

        Raises:
            TypeError: not exactly an nn.Conv2d (a subclass's forward would be ignored).
            ValueError: the conv is not a non-overlapping square patchifier.

        Example:
            >>> conv = torch.nn.Conv2d(3, 768, kernel_size=16, stride=16)  # e.g. torchvision's conv_proj
            >>> embed = fastvit.nn.FusedPatchEmbed.from_conv(conv, name="conv_proj", img_size=224)
            >>> embed.conv_proj is conv, list(embed.state_dict())
            (True, ['conv_proj.weight', 'conv_proj.bias'])
            >>> embed(torch.randn(2, 3, 224, 224)).shape  # no prefix tokens, no pos_embed
            torch.Size([2, 196, 768])
        """
        if type(conv) is not nn.Conv2d:  # a subclass (timm's StdConv2d) computes something else
            raise TypeError(
                f"conv must be exactly nn.Conv2d, not a subclass whose forward the fused op would ignore "
                f"(timm's StdConv2d standardizes its weight); got {type(conv).__name__}"
            )
        kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        problems = []
        if kernel[0] != kernel[1]:
            problems.append(f"kernel_size {kernel} is not square")
        if stride != kernel:
            problems.append(f"stride {stride} != kernel_size {kernel}")
        if padding not in ((0, 0), "valid"):
            problems.append(f"padding {conv.padding!r} is not 0")
        if tuple(conv.dilation) != (1, 1):
            problems.append(f"dilation {tuple(conv.dilation)} is not 1")
        if conv.groups != 1:
            problems.append(f"groups {conv.groups} is not 1")
        if problems:
            raise ValueError(f"FusedPatchEmbed.from_conv needs a patchifying conv: {'; '.join(problems)}")
        if not name.isidentifier() or hasattr(cls, name):
            raise ValueError(f"name must be an identifier that FusedPatchEmbed does not use itself, got {name!r}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(conv, name, img_size, strict_img_size, dynamic_img_pad)
        return module

    @property
    def conv(self) -> nn.Conv2d:
        """The projection Conv2d (registered as ``self.<conv_name>``).

        Example:
            >>> fastvit.nn.FusedPatchEmbed(32, 8, 3, 16).conv
            Conv2d(3, 16, kernel_size=(8, 8), stride=(8, 8))
        """
        return self._modules[self.conv_name]  # type: ignore[return-value]

    def forward(
        self,
        x: torch.Tensor,
        *,
        pos_embed: torch.Tensor | None = None,
        prefix_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) images -> (B, P+N, D) tokens.

        Args:
            x: images, contiguous or channels_last.
            pos_embed: (1, P+N, D) or (1, N, D) (patches only), owned by the model; or None.
            prefix_tokens: (1, P, D) cls / distillation / register tokens, owned by the model; or None.

        Returns:
            (B, P+N, D) tokens, N = (H // p) * (W // p) (rounded up with ``dynamic_img_pad``).

        dtypes: outside autocast x, pos_embed and prefix_tokens must have the projection's dtype,
        and the tokens have it (fp16, bf16 and fp32 run the kernels, float64 the ``torch`` route).
        Under autocast the projection runs in the autocast dtype and the tokens take it, promoted
        with pos_embed's and prefix_tokens' (fp32 model parameters give fp32 tokens), as in
        ``fastvit.patch_embed``.

        Example:
            >>> embed = fastvit.nn.FusedPatchEmbed(224, 16, 3, 768)
            >>> cls, pos = torch.zeros(1, 1, 768), torch.zeros(1, 197, 768)
            >>> embed(torch.randn(2, 3, 224, 224), pos_embed=pos, prefix_tokens=cls).shape
            torch.Size([2, 197, 768])
            >>> with torch.autocast("cpu", dtype=torch.bfloat16):
            ...     embed(torch.randn(2, 3, 224, 224)).dtype  # no fp32 pos_embed to promote with
            torch.bfloat16
        """
        strict = x.dim() == 4 and self.img_size is not None and self.strict_img_size
        if strict and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input image size {tuple(x.shape[-2:])} does not match the module's img_size "
                f"{self.img_size} (x is {tuple(x.shape)}); build it with strict_img_size=False "
                "to accept other sizes"
            )
        p = self.patch_size[0]
        partial = x.dim() == 4 and not self.dynamic_img_pad and (x.shape[-2] % p or x.shape[-1] % p)
        if partial and strict:  # the strict img_size is not whole patches: timm's conv drops the rest
            x = crop_to_patches(x, p)
        elif partial:
            raise ValueError(
                f"input height and width {tuple(x.shape[-2:])} must be multiples of the patch size {p} "
                f"(x is {tuple(x.shape)}); build the module with dynamic_img_pad=True to zero-pad them"
            )
        conv = self.conv
        changed = None
        built_with = getattr(self, "conv_settings", None)  # (None: a module pickled before it was kept)
        if built_with is not None and conv_settings(conv) != built_with:
            changed = f"{self.conv_name}'s stride, padding, dilation or groups changed"
        problem = submodules_called_problem(self, ((self.conv_name, conv),), changed)
        if problem is not None:  # the conv called as a module: its hooks run, its settings apply
            return assemble_tokens(conv(pad_to_patches(x, p) if self.dynamic_img_pad else x), pos_embed, prefix_tokens)
        return patch_embed(
            x, conv.weight, conv.bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens,
            dynamic_img_pad=self.dynamic_img_pad,
        )

    def extra_repr(self) -> str:
        """The module's sizes and options in its ``repr`` (the backend is read at call time).

        Example:
            >>> fastvit.nn.FusedPatchEmbed(32, 8, 3, 16).extra_repr()[:40]
            'img_size=(32, 32), patch_size=8, in_chan'
        """
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size[0]}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}, bias={self.conv.bias is not None}, "
            f"dynamic_img_pad={self.dynamic_img_pad}, backend={current_backend()}"
        )
