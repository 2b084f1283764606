"""``nat-tiny``: a small hierarchical Neighborhood Attention Transformer (NAT / DiNAT layout).

Reference: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023) and "Dilated Neighborhood Attention
Transformer", github.com/SHI-Labs/Neighborhood-Attention-Transformer (``classification/nat.py``): a convolutional
tokenizer (two 3x3 stride-2 convs), stages of pre-norm NA blocks, 3x3 stride-2 conv downsampling between stages,
layer norm, global average pooling and a linear head.  This tiny variant drops the relative position bias and
uses dilation 2 in its second stage (DiNAT style) so both NATTEN code paths are exercised.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import MaskedBlock
from ..masks import neighborhood
from . import register


class ConvNorm(nn.Module):
    """Conv(s) then LayerNorm over channels; (B, C, H, W) -> (B, H, W, C)."""

    def __init__(self, convs: nn.Module, dim: int):
        super().__init__()
        self.convs, self.norm = convs, nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.convs(x).permute(0, 2, 3, 1))


class NAT(nn.Module):
    def __init__(self, image_size=224, embed_dim=32, depths=(2, 2), heads=(2, 4), kernel=7, dilations=(1, 2),
                 mlp_ratio=3.0, num_classes=10):
        super().__init__()
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = ConvNorm(nn.Sequential(nn.Conv2d(3, dims[0] // 2, 3, 2, 1),
                                                  nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1)), dims[0])
        side = -(-image_size // 4)  # two stride-2, padding-1, 3x3 convs: ceil(ceil(n / 2) / 2)
        self.stages, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for i, (dim, depth, head, dilation) in enumerate(zip(dims, depths, heads, dilations)):
            mask = neighborhood(kernel, dilation=dilation)
            self.stages.append(nn.ModuleList(MaskedBlock(dim, head, mask, grid=(side, side), mlp_ratio=mlp_ratio)
                                             for _ in range(depth)))
            if i + 1 < len(dims):
                self.downsamples.append(ConvNorm(nn.Conv2d(dim, dims[i + 1], 3, 2, 1), dims[i + 1]))
                side = (side + 1) // 2
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)                       # (B, H, W, C)
        for i, blocks in enumerate(self.stages):
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
            for block in blocks:
                x = block(x)
            x = x.reshape(B, H, W, C)
            if i < len(self.downsamples):
                x = self.downsamples[i](x.permute(0, 3, 1, 2))
        return self.head(self.norm(x).mean(dim=(1, 2)))


def _inputs(image_size, **_):
    return {"image": (1, 3, image_size, image_size)}


@register("nat-tiny", "NAT, 2 stages (56x56 k7, 28x28 k7 dilation 2), 224x224 image -> 10 logits", _inputs,
          outputs=("logits",), image_size=224, embed_dim=32, depths=[2, 2], heads=[2, 4], kernel=7, dilations=[1, 2], num_classes=10)
def nat_tiny(**config) -> NAT:
    return NAT(**config)
