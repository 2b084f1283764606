"""Single attention blocks for benchmarks: one masked self-attention layer with qkv and output projections.

Each is registered by name (``edgeattn export na2d-block``) with its mask as config, so a file's metadata
rebuilds it exactly.  Widths follow the benchmark cases: 2 heads x 32 channels.
"""

from __future__ import annotations

from torch import nn

from ..layers import MaskedSelfAttention
from ..masks import FAMILIES
from .common import token_inputs
from .registry import register


class AttentionBlock(nn.Module):
    """(B, N, dim) tokens -> (B, N, dim): qkv projection, masked attention, output projection."""

    def __init__(self, mask: dict, dim: int = 64, heads: int = 2, grid=None, seq_len=None):
        super().__init__()
        params = dict(mask)
        factory = FAMILIES[params.pop("family")][0]
        self.attn = MaskedSelfAttention(
            dim, heads, factory(**params), grid=tuple(grid) if grid else None, seq_len=seq_len
        )

    def forward(self, tokens):
        return self.attn(tokens)


def _block(name: str, description: str, mask: dict, **shape):
    register(name, description, token_inputs, mask=mask, dim=64, heads=2, **shape)(AttentionBlock)


_block(
    "na2d-block",
    "2-D neighborhood attention block, 56x56 tokens, kernel 7, 2 heads x 32",
    {"family": "neighborhood", "kernel": 7},
    grid=[56, 56],
)
_block(
    "na2d-dilated-block",
    "2-D neighborhood attention block, 56x56 tokens, kernel 7, dilation 2, 2 heads x 32",
    {"family": "neighborhood", "kernel": 7, "dilation": 2},
    grid=[56, 56],
)
_block(
    "na3d-block",
    "3-D neighborhood attention block, 8x28x28 tokens, kernel (3,7,7), 2 heads x 32",
    {"family": "neighborhood", "kernel": [3, 7, 7]},
    grid=[8, 28, 28],
)
_block(
    "swin-block",
    "Swin shifted-window attention block, 56x56 tokens, window 7, shift 3, 2 heads x 32",
    {"family": "window", "size": 7, "shift": 3},
    grid=[56, 56],
)
_block(
    "sliding-block",
    "1-D sliding-window attention block, 4096 tokens, window 256, 2 heads x 32",
    {"family": "sliding_window", "window": 256},
    seq_len=4096,
)
_block("causal-block", "causal attention block, 2048 tokens, 2 heads x 32", {"family": "causal"}, seq_len=2048)
