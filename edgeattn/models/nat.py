"""Neighborhood Attention Transformers: ``nat-mini``, ``dinat-mini`` and the small ``nat-tiny``.

Reference: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023) and "Dilated Neighborhood Attention
Transformer", github.com/SHI-Labs/Neighborhood-Attention-Transformer: ``classification/nat.py`` (ConvTokenizer,
NATLayer, NATBlock, ConvDownsampler, NAT, nat_mini) and ``classification/dinat.py`` (dinat_mini's per-block
dilations); the attention module is NATTEN's NeighborhoodAttention2D (github.com/SHI-Labs/NATTEN,
``src/natten/na2d.py`` at v0.17.5) with ``rel_pos_bias=True``.

- tokenizer: two 3x3 stride-2 convs, then LayerNorm over channels (tokens kept as (B, H, W, C));
- levels of pre-norm blocks: x + attn(norm1(x)), x + mlp(norm2(x)); attention is qkv -> q * head_dim^-0.5,
  q k^T + rpb over the NATTEN neighborhood, softmax, v, proj;
- between levels a 3x3 stride-2 conv without bias, then LayerNorm; then LayerNorm, mean over tokens, linear head.

The neighborhood (window shifted at borders, dilation groups) is a static mask (``masks.neighborhood``); the
learned ``rpb`` (heads, 2k-1, 2k-1) is gathered through the mask table's NATTEN-exact index at run time.
Parameter names and shapes are the reference's state-dict keys (``levels.0.blocks.0.attn.rpb``,
``levels.0.downsample.reduction.weight``...), so an official checkpoint loads with ``load_state_dict``.
Weight init follows the reference (truncated-normal linear weights and rpb, std 0.02; zero linear biases).
Dropout and stochastic depth are identities at inference and are left out.

``nat-tiny`` is a small 2-level variant without rpb, with dilation 2 in its second level, so both NATTEN code
paths are exercised quickly.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import tables
from ..errors import InvalidArgument
from ..layers import MaskedBlock, init_linear
from ..masks import neighborhood
from .common import image_inputs
from .registry import register


class ConvTokenizer(nn.Module):
    """(B, 3, H, W) -> (B, H/4, W/4, C): two 3x3 stride-2 convs, LayerNorm over channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(3, dim // 2, 3, 2, 1), nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image):
        return self.norm(self.proj(image).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): 3x3 stride-2 conv without bias, LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLevel(nn.Module):
    """One level (the reference's NATBlock): blocks on a (side, side) grid, then an optional downsampler."""

    def __init__(self, dim, heads, side, masks, mlp_ratio, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            MaskedBlock(dim, heads, mask, grid=(side, side), mlp_ratio=mlp_ratio, named_mlp=True) for mask in masks
        )
        self.downsample = ConvDownsampler(dim) if downsample else None

    def forward(self, x):
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for block in self.blocks:
            x = block(x)
        x = x.reshape(B, H, W, C)
        return x if self.downsample is None else self.downsample(x)


class NAT(nn.Module):
    """NAT / DiNAT classifier.  ``dilations``: per level an int (every block) or one int per block."""

    def __init__(
        self,
        image_size=224,
        embed_dim=64,
        depths=(3, 4, 6, 5),
        heads=(2, 4, 8, 16),
        kernel=7,
        dilations=None,
        mlp_ratio=3.0,
        num_classes=1000,
        rpb=False,
    ):
        super().__init__()
        if not len(depths) == len(heads) == len(dilations or depths):
            raise InvalidArgument(
                f"depths, heads and dilations need one entry per level, got {list(depths)}, "
                f"{list(heads)} and {dilations}"
            )
        dilations = dilations or [1] * len(depths)
        per_block = [[d] * n if isinstance(d, int) else list(d) for d, n in zip(dilations, depths)]
        if [len(d) for d in per_block] != list(depths):
            raise InvalidArgument(f"dilations {dilations} do not give one dilation per block of depths {list(depths)}")
        self.patch_embed = ConvTokenizer(embed_dim)
        side = -(-image_size // 4)  # two stride-2, padding-1, 3x3 convs: ceil(ceil(n / 2) / 2)
        self.levels = nn.ModuleList()
        masks = {d: neighborhood(kernel, dilation=d, rpb=rpb) for d in sorted({d for ds in per_block for d in ds})}
        with tables.reuse():  # blocks of a level with the same mask share one table
            for i, (head, level_dilations) in enumerate(zip(heads, per_block)):
                self.levels.append(
                    NATLevel(
                        embed_dim * 2**i,
                        head,
                        side,
                        [masks[d] for d in level_dilations],
                        mlp_ratio,
                        downsample=i + 1 < len(depths),
                    )
                )
                side = (side + 1) // 2
        features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, num_classes)
        init_linear(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)  # (B, H, W, C)
        for level in self.levels:
            x = level(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


@register(
    "nat-tiny",
    "NAT, 2 stages (56x56 k7, 28x28 k7 dilation 2), 224x224 image -> 10 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    embed_dim=32,
    depths=[2, 2],
    heads=[2, 4],
    kernel=7,
    dilations=[1, 2],
    num_classes=10,
)
def nat_tiny(**config) -> NAT:
    return NAT(**config)


@register(
    "nat-mini",
    "NAT-Mini (SHI-Labs nat_mini): depths 3/4/6/5, k7, rpb, 224x224 image -> 1000 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    embed_dim=64,
    depths=[3, 4, 6, 5],
    heads=[2, 4, 8, 16],
    kernel=7,
    mlp_ratio=3.0,
    num_classes=1000,
    rpb=True,
)
def nat_mini(**config) -> NAT:
    return NAT(**config)


@register(
    "dinat-mini",
    "DiNAT-Mini (SHI-Labs dinat_mini): NAT-Mini with per-block dilations up to 8, rpb, 224x224 image -> 1000 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    embed_dim=64,
    depths=[3, 4, 6, 5],
    heads=[2, 4, 8, 16],
    kernel=7,
    dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    mlp_ratio=3.0,
    num_classes=1000,
    rpb=True,
)
def dinat_mini(**config) -> NAT:
    return NAT(**config)
