"""nn.Modules built on the masked-attention op.  Tables are non-persistent buffers: derived, never saved."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import tables
from .attention import masked_attention
from .masks.base import as_mask


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over ``N`` tokens with a static mask compiled for one shape.

    ``grid`` lays the tokens on a 1-3D grid (row-major) for grid masks; ``seq_len`` gives N for sequence masks.
    Input and output are (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, mask, grid=None, seq_len: Optional[int] = None,
                 qkv_bias: bool = True, proj: bool = True):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads must be a positive divisor of dim={dim}, got {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.mask = as_mask(mask)
        table = tables.build(self.mask, q_len=seq_len, grid=grid, heads=heads)
        self.seq_len = table.shape.q_len
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()
        self.table_bytes = table.nbytes
        self.register_buffer("attn_mask", table.mask, persistent=False)
        self.register_buffer("attn_bias", table.bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if N != self.seq_len:
            raise ValueError(f"{type(self).__name__} was built for {self.seq_len} tokens, got {N}: the mask tables are "
                             f"static, build the layer for this shape")
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = masked_attention(q, k, v, self.attn_mask, self.attn_bias, mask_name=self.mask.name)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, mask={self.mask.name}, tokens={self.seq_len}"


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MaskedBlock(nn.Module):
    """Pre-norm transformer block (NAT / Swin / ViT style): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mask, grid=None, seq_len: Optional[int] = None, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, mask, grid=grid, seq_len=seq_len)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
