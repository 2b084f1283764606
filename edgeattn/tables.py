"""Compile a Mask for a fixed shape into a static table: the only place index/mask arrays are produced.

A table is what an attention layer carries as a non-persistent buffer and what export writes as initializers.
``DenseTable`` keeps the whole (heads, Nq, Nkv) boolean mask (1 byte per entry, a quarter of a float mask) and,
for masks with a ``bias_mod``, a float bias of the same shape.  Block tables (tiles with gather indices) will
sit beside it with the same ``layout`` / ``nbytes`` / ``tensors()`` surface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .masks.base import Shape, as_mask, evaluate, index_grid

# Rows evaluated per step: bounds the broadcast temporaries (int64 indices) to ~64 MB on large grids.
_ROW_CHUNK_ELEMS = 8 * 1024 * 1024


@dataclass(frozen=True)
class DenseTable:
    name: str
    shape: Shape
    mask: torch.Tensor                    # bool (heads or 1, Nq, Nkv)
    bias: Optional[torch.Tensor] = None   # float32 (heads or 1, Nq, Nkv)
    layout: str = "dense"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    @property
    def fully_masked_rows(self) -> int:
        return int((~self.mask.any(-1)).sum())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mask,) if self.bias is None else (self.mask, self.bias)


def build(mask, q_len=None, kv_len=None, grid=None, heads: int = 1, layout: str = "dense") -> DenseTable:
    """Evaluate ``mask`` (a Mask or a bare mask_mod) for one shape by broadcasting over index tensors."""
    if layout != "dense":
        raise ValueError(f"layout must be 'dense' (block tables are not available yet), got {layout!r}")
    mask = as_mask(mask)
    shape = Shape.of(q_len, kv_len, grid)
    mask_mod, bias_mod = mask.mods(shape)
    rows = max(1, _ROW_CHUNK_ELEMS // shape.kv_len)
    masks, biases = [], []
    for start in range(0, shape.q_len, rows):
        index = index_grid(shape, heads, slice(start, min(start + rows, shape.q_len)))
        masks.append(evaluate(mask_mod, index, heads))
        if bias_mod is not None:
            biases.append(evaluate(bias_mod, index, heads, "bias_mod").to(torch.float32))
    return DenseTable(mask.name, shape, _squeeze_heads(torch.cat(masks, 1)),
                      _squeeze_heads(torch.cat(biases, 1)) if biases else None)


def _squeeze_heads(t: torch.Tensor) -> torch.Tensor:
    """Store one head when every head's table is identical (the common case): the runtime broadcasts it."""
    if t.shape[0] > 1 and bool((t == t[:1]).all()):
        t = t[:1]
    return t.contiguous()
