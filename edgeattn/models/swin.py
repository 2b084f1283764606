"""``swin-tiny-block``: one Swin Transformer stage (a window block and a shifted-window block) on 56x56 tokens.

Reference: Liu et al., "Swin Transformer" (ICCV 2021), github.com/microsoft/Swin-Transformer
(``models/swin_transformer.py``, SwinTransformerBlock): blocks alternate shift 0 and shift window//2; a window
no smaller than the map is shrunk to the map and not shifted.  The cyclic shift and window partition are
expressed as a static window mask on the unshifted grid (see ``edgeattn.masks.window``); this small block has
no relative position bias.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import MaskedBlock
from ..masks import window
from . import register


class SwinStage(nn.Module):
    def __init__(self, grid=(56, 56), dim=64, heads=2, window_size=7, depth=2, mlp_ratio=4.0):
        super().__init__()
        grid = tuple(grid)
        if min(grid) <= window_size:  # Swin's rule: one window covering the map, no shift
            window_size, shift = min(grid), 0
        else:
            shift = window_size // 2
        self.blocks = nn.ModuleList(
            MaskedBlock(dim, heads, window(window_size, shift=shift if i % 2 else 0), grid=grid, mlp_ratio=mlp_ratio)
            for i in range(depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


def _inputs(grid, dim, **_):
    return {"tokens": (1, grid[0] * grid[1], dim)}


@register("swin-tiny-block", "Swin stage: window 7 + shifted window 7 blocks on 56x56 tokens, dim 64, 2 heads",
          _inputs, grid=[56, 56], dim=64, heads=2, window_size=7, depth=2)
def swin_tiny_block(**config) -> SwinStage:
    return SwinStage(**config)
