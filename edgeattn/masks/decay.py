"""Retention decays (RetNet / RMT): every key is allowed, scores get a per-head bias ``log(gamma_h) * distance``.

Reference: RMT, "Retentive Networks Meet Vision Transformers" (CVPR 2024), github.com/qhfan/RMT
(``classfication_release/RMT.py``: RetNetRelPos2d.generate_2d_decay / generate_1d_decay).  Head h decays with
``gamma_h`` in (0, 1]; the bias added before softmax is ``log(gamma_h)`` times

- ``manhattan_decay``: the Manhattan distance between the grid coordinates of query and key (RMT's full
  attention; any 1-3D grid, row-major flat indices);
- ``decay_1d``: ``|q - k|`` on a sequence (RMT's separable attention along one row or one column).  Queries are
  aligned to the end of the keys, as for the other sequence masks.

The product is formed in float32 (distance as float32 times float32 ``log(gamma_h)``), as the reference does, so
gammas given as ``exp`` of the reference's float32 log-decays reproduce its tables bit for bit.
"""

from __future__ import annotations

import math
import numbers
from typing import cast

import torch

from ..errors import InvalidArgument
from .base import Mask, Shape, allow_all, axis_coords


def manhattan_decay(gammas) -> Mask:
    """All keys allowed; bias ``log(gammas[h]) * (|dy| + |dx| ...)`` on a 1-3D grid.  One gamma per head, or
    one float shared by every head."""
    log_gammas, label = _log_gammas("manhattan_decay", gammas)

    def mods(shape: Shape):
        grid = shape.require_grid("manhattan_decay")

        def bias_mod(b, h, q_idx, kv_idx):
            distance = cast(
                torch.Tensor,
                sum(
                    (qc - kc).abs()  # a tensor: a grid has at least one axis
                    for qc, kc in zip(axis_coords(q_idx, grid), axis_coords(kv_idx, grid))
                ),
            )
            return distance.to(torch.float32) * _per_head(log_gammas, h)

        return allow_all, bias_mod

    return Mask(f"manhattan_decay_{label}", mods)


def decay_1d(gammas) -> Mask:
    """All keys allowed; bias ``log(gammas[h]) * |q - k|`` on a sequence.  One gamma per head, or one float."""
    log_gammas, label = _log_gammas("decay_1d", gammas)

    def mods(shape: Shape):
        offset = shape.kv_len - shape.q_len  # queries are the last q_len positions

        def bias_mod(b, h, q_idx, kv_idx):
            return (q_idx + offset - kv_idx).abs().to(torch.float32) * _per_head(log_gammas, h)

        return allow_all, bias_mod

    return Mask(f"decay_1d_{label}", mods)


def _log_gammas(family: str, gammas) -> tuple[torch.Tensor, str]:
    """Validate gammas -> (float32 log-gammas, name label ``g0.75_0.875``).  A single float gives one entry."""
    if isinstance(gammas, torch.Tensor):
        gammas = gammas.tolist()
    values = (
        [gammas] if isinstance(gammas, numbers.Real) else list(gammas) if isinstance(gammas, (list, tuple)) else None
    )
    if not values or any(isinstance(g, bool) or not isinstance(g, numbers.Real) for g in values):
        raise InvalidArgument(
            f"{family} takes gammas: one decay rate in (0, 1] per head (or one float for all heads), got {gammas!r}"
        )
    for g in values:
        if not (0.0 < float(g) <= 1.0):
            raise InvalidArgument(f"{family} gammas must be in (0, 1] (log(gamma) is the per-step decay), got {g!r}")
    # log in float64 then one rounding to float32: exp() of a float32 log-decay comes back exactly
    log_gammas = torch.tensor([math.log(float(g)) for g in values], dtype=torch.float64).to(torch.float32)
    return log_gammas, "g" + "_".join(f"{float(g):.6g}" for g in values)


def _per_head(log_gammas: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """log(gamma) for head index tensor ``h``: one shared value, or one per head (the counts must match)."""
    if log_gammas.numel() == 1:
        return log_gammas[0]
    # tables evaluate every head at once with h shaped (1, heads, 1, 1); FlexAttention passes one head index
    heads = h.shape[1] if h.ndim == 4 else int(h.max()) + 1
    if (h.ndim == 4 and heads != log_gammas.numel()) or heads > log_gammas.numel():
        raise InvalidArgument(
            f"the decay has {log_gammas.numel()} gammas (one per head) but the layer has {heads} "
            f"heads; give one gamma per head"
        )
    return log_gammas[h]
