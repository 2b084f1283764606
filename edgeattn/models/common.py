"""Pieces shared by several registered models.  Registers no model itself.

The example-input specs below are what :func:`edgeattn.models.register` takes as ``inputs``: a function of the
model's config returning input name -> shape (float32 normal noise).  Models whose inputs are only an image, or
only a token sequence, share these.

Not shared, on purpose: :mod:`.swin` and :mod:`.rmt` each define ``PatchEmbed``, ``PatchMerging`` and
``BasicLayer`` because their references name their classes so, but the layers differ.  Swin patchifies with one
p x p conv and a LayerNorm, merges 2x2 neighbours by concatenation, LayerNorm and Linear, and runs window-attention
stages on (B, N, C) tokens; RMT has a 4-conv BatchNorm stem, merges with a strided 3x3 conv and BatchNorm, and
runs retention stages on (B, H, W, C) maps.  Each module tree also keeps its reference's state-dict keys.  PPMA
reuses RMT's pieces from :mod:`.rmt` itself.
"""

from __future__ import annotations

import math


def image_inputs(image_size: int, in_chans: int = 3, **_) -> dict[str, tuple[int, ...]]:
    """One ``image`` of (1, in_chans, image_size, image_size): the input of the image classifiers."""
    return {"image": (1, in_chans, image_size, image_size)}


def token_inputs(dim: int, grid=None, seq_len=None, **_) -> dict[str, tuple[int, ...]]:
    """One ``tokens`` sequence of (1, N, dim), N from the token ``grid`` or ``seq_len``: the input of single
    attention blocks and stages."""
    return {"tokens": (1, math.prod(grid) if grid else seq_len, dim)}
