"""Conformance probes: one masked attention over given q, k and v, small enough to run anywhere, each configured to
pin one semantic that runtimes have got wrong (see :mod:`edgeattn.conformance`).  Registered unlisted as
``probe-attention``, so a probe file's metadata rebuilds its PyTorch reference and ``edgeattn check`` runs it on
any device like any exported model."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import masks
from ..layers import MaskTable
from .registry import register


def _empty_rows() -> masks.Mask:
    """Causal, except that every fourth query may attend to nothing (its output is zeros, never NaN or mean(v))."""
    return masks.custom(lambda b, h, q, kv: (kv <= q) & (q % 4 != 3), name="causal_empty_rows")


# the probes' masks by name (a probe's config names one, so its metadata rebuilds it)
PROBE_MASKS = {
    "causal": masks.causal,
    "empty_rows": _empty_rows,
    "sliding": lambda: masks.sliding_window(3),
    "sinks": lambda: masks.sinks(2, 4),
    "neighborhood": lambda: masks.neighborhood(5),
}


class ProbeAttention(nn.Module):
    """``out = attention(q, k, v)`` under the named mask; ``kv_heads < heads`` repeats each key/value head for its
    group of query heads (GQA); ``softcap`` caps the scaled scores before the mask.  ``head_dim``, ``scale_inputs``
    and ``value_offset`` shape the example inputs only (:func:`_inputs`)."""

    def __init__(
        self,
        mask: str,
        heads: int,
        kv_heads: int,
        q_len: int,
        kv_len: int,
        grid,
        head_dim: int,
        softcap: float,
        layout: str,
        scale_inputs: float,
        value_offset: float,
    ):
        super().__init__()
        self.group, self.softcap = heads // kv_heads, softcap or None
        self.table = MaskTable(
            PROBE_MASKS[mask](),
            heads,
            grid=grid,
            q_len=None if grid else q_len,
            kv_len=None if grid else kv_len,
            layout=layout,
        )

    def forward(self, q, k, v):
        if self.group > 1:
            k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        return self.table(q, k, v, softcap=self.softcap)


def _inputs(heads, kv_heads, q_len, kv_len, grid, head_dim, scale_inputs, value_offset, **_):
    if grid:
        q_len = kv_len = math.prod(grid)

    def normal(*shape, times=1.0, plus=0.0):
        return lambda g: torch.randn(*shape, generator=g) * times + plus

    return {
        "q": normal(1, heads, q_len, head_dim, times=scale_inputs),
        "k": normal(1, kv_heads, kv_len, head_dim, times=scale_inputs),
        "v": normal(1, kv_heads, kv_len, head_dim, plus=value_offset),
    }


register(
    "probe-attention",
    "conformance probe: masked attention over given q, k, v",
    _inputs,
    outputs=("out",),
    listed=False,
    mask="causal",
    heads=2,
    kv_heads=2,
    q_len=16,
    kv_len=16,
    grid=None,
    head_dim=8,
    softcap=0.0,
    layout="auto",
    scale_inputs=1.0,
    value_offset=0.0,
)(ProbeAttention)
