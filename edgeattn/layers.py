"""nn.Modules built on the masked-attention op.  Tables are non-persistent buffers: derived, never saved."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import tables
from .attention import TABLE_INPUTS, attend
from .masks.base import Shape, as_mask


class MaskTable(nn.Module):
    """A mask compiled for one shape; calling it runs masked attention over its table.

    The table's tensors are non-persistent buffers named ``attn_<tensor>`` (``attn_mask``, ``attn_kv_index``...):
    they move with ``.to()`` but are never saved, since they are derived from the mask.  ``layout`` is
    ``"dense"``, ``"blocked"`` or ``"auto"`` (blocked when it computes at most half of the dense scores).
    Export switches the layout to what the chosen lowering needs (:meth:`use_layout`) and sets ``lowering``.
    """

    def __init__(self, mask, heads: int, grid=None, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                 layout: str = "auto"):
        super().__init__()
        self.mask = as_mask(mask)
        self.shape = Shape.of(q_len, kv_len, grid)
        self.heads = heads
        self.lowering: Optional[str] = None   # set by export for the duration of one export
        self.lowering_reason = ""
        self.use_layout(layout)

    def use_layout(self, layout: str, table=None) -> None:
        """Switch to a table of ``layout``; ``table`` is one already built for this mask and shape."""
        if table is None or table.layout != layout:
            table = tables.build(self.mask, self.shape.q_len, self.shape.kv_len, self.shape.grid, self.heads, layout)
        device = next((b.device for b in self.buffers()), None)
        for name in TABLE_INPUTS.get(getattr(self, "layout", None), ()):
            delattr(self, f"attn_{name}")
        self.table, self.layout, self.table_bytes = table, table.layout, table.nbytes
        for name in TABLE_INPUTS[table.layout]:
            value = getattr(table, name)
            self.register_buffer(f"attn_{name}", value if value is None or device is None else value.to(device),
                                 persistent=False)

    def forward(self, q, k, v, scale: Optional[float] = None) -> torch.Tensor:
        tensors = [getattr(self, f"attn_{name}") for name in TABLE_INPUTS[self.layout]]
        return attend(q, k, v, self.layout, tensors, scale, self.mask.name, self.lowering, self.lowering_reason)

    def extra_repr(self) -> str:
        return f"mask={self.mask.name}, layout={self.layout}, tokens={self.shape.q_len}x{self.shape.kv_len}"


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over ``N`` tokens with a static mask compiled for one shape.

    ``grid`` lays the tokens on a 1-3D grid (row-major) for grid masks; ``seq_len`` gives N for sequence masks.
    Input and output are (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, mask, grid=None, seq_len: Optional[int] = None,
                 qkv_bias: bool = True, proj: bool = True, layout: str = "auto"):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads must be a positive divisor of dim={dim}, got {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.table = MaskTable(mask, heads, grid=grid, q_len=seq_len, layout=layout)
        self.mask, self.seq_len = self.table.mask, self.table.shape.q_len
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if N != self.seq_len:
            raise ValueError(f"{type(self).__name__} was built for {self.seq_len} tokens, got {N}: the mask tables are "
                             f"static, build the layer for this shape")
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.table(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MaskedBlock(nn.Module):
    """Pre-norm transformer block (NAT / Swin / ViT style): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mask, grid=None, seq_len: Optional[int] = None, mlp_ratio: float = 4.0,
                 layout: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, mask, grid=grid, seq_len=seq_len, layout=layout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
