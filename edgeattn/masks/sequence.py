"""1-D sequence masks: causal, sliding window, attention sinks, segments (prefill).

Queries are aligned to the end of the keys (query i sits at position ``i + kv_len - q_len``), which is plain
top-left causal when ``q_len == kv_len`` and the usual alignment when queries are the tail of a KV cache.
Window conventions follow FlexAttention's attention-gym examples: ``window`` is how far a query looks back.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from .base import Mask, Shape, check_int


def _positions(shape: Shape, q_idx):
    return q_idx + (shape.kv_len - shape.q_len)


def causal() -> Mask:
    """Key allowed iff it is not after the query."""

    def mods(shape):
        return (lambda b, h, q, kv: kv <= _positions(shape, q)), None

    return Mask("causal", mods)


def sliding_window(window: int, causal: bool = True) -> Mask:
    """Causal: ``0 <= q - k <= window``; non-causal: ``|q - k| <= window``."""
    window = check_int("window", window, low=1)
    if not isinstance(causal, bool):
        raise InvalidArgument(f"causal must be a bool, got {causal!r}")

    def mods(shape):
        def mask_mod(b, h, q, kv):
            delta = _positions(shape, q) - kv
            return ((delta >= 0) & (delta <= window)) if causal else (delta.abs() <= window)

        return mask_mod, None

    return Mask(f"sliding_window_w{window}" + ("" if causal else "_bidirectional"), mods)


def sinks(n_sink: int, window: int) -> Mask:
    """StreamingLLM: causal, and a key is kept iff it is one of the first ``n_sink`` or within ``window`` back."""
    n_sink = check_int("n_sink", n_sink, low=0)
    window = check_int("window", window, low=0)

    def mods(shape):
        def mask_mod(b, h, q, kv):
            pos = _positions(shape, q)
            return (kv <= pos) & ((kv < n_sink) | (pos - kv <= window))

        return mask_mod, None

    return Mask(f"sinks_s{n_sink}_w{window}", mods)


def segments(segment_ids) -> Mask:
    """Prefill over concatenated segments: bidirectional inside a segment, causal across segments.

    A key is allowed iff ``seg(k) <= seg(q)`` and (same segment, or ``k <= q``).  ``segment_ids`` holds one
    non-decreasing non-negative id per key position; queries take the ids of the last ``q_len`` positions.
    """
    ids = torch.as_tensor(segment_ids)
    if ids.ndim != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InvalidArgument(
            f"segment_ids must be a non-empty 1-D sequence of integers, got {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.long()
    if (ids < 0).any() or (ids[1:] < ids[:-1]).any():
        raise InvalidArgument(
            "segment_ids must be non-negative and non-decreasing (segments are contiguous), "
            f"got {ids.tolist()[:16]}{'...' if ids.numel() > 16 else ''}"
        )
    lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()

    def mods(shape):
        if shape.q_len > shape.kv_len:
            raise InvalidArgument(
                f"segments needs q_len <= kv_len (queries are the tail of the keys), "
                f"got q_len={shape.q_len}, kv_len={shape.kv_len}"
            )
        if ids.numel() != shape.kv_len:
            raise InvalidArgument(
                f"segment_ids has {ids.numel()} entries but the sequence has {shape.kv_len} keys; "
                f"give one id per key position"
            )

        def mask_mod(b, h, q, kv):
            pos = _positions(shape, q)
            seg_q, seg_k = ids[pos], ids[kv]
            return (seg_k == seg_q) | ((seg_k < seg_q) & (kv <= pos))

        return mask_mod, None

    return Mask("segments_" + "-".join(map(str, lengths)), mods)
