"""Radial attention for video diffusion: a static block-sparse mask whose band shrinks with temporal distance.

Reference: Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video
Generation", github.com/mit-han-lab/radial-attention, ``radial_attn/attn_mask.py`` (gen_log_mask_shrinked,
get_window_width, get_diagonal_split_mask, shrinkMaskStrict) as called from ``radial_attn/models/{wan,hunyuan}``.

Tokens are ``frames`` frames of ``T`` tokens each, frame-major.  For query frame i and key frame j at distance
``d = |i - j|`` the reference first builds a (T x T) token mask for the frame pair:

- the attention sink (Wan; ``sink=True``): key frame 0 is allowed in full;
- otherwise a band ``|r - c| <= width`` over the in-frame token index, where ``width = T`` for ``d <= 1`` and
  ``max(2**bit_length(T) / 2**bit_length(d) * decay_factor, block_size)`` beyond;
- the band is kept only when ``L = 2**bit_length(T) / 2**bit_length(d)`` (no decay factor) is at least 128, or
  ``d`` is a multiple of ``int(128 / L)``: far frame pairs keep fewer diagonals (128 is hard-coded there).
  With fewer than 128 tokens per frame this drops ``d = 1`` too (``d = 0`` is always kept): the reference's rule.

The mask is then coarsened to ``block_size`` x ``block_size`` blocks of the whole sequence, which is what the
reference's block-sparse kernels run: the pair's token mask is placed at its offset inside its first block
(``i*T % block_size``), cut to ``ceil(T / block_size)`` blocks per side (rows/columns past that are dropped, as
the reference does), and a block is kept iff more than 60% of its non-empty columns are more than 1/3 full.
A sequence block is allowed iff any frame pair keeps it.  ``text`` tokens after the video (HunyuanVideo's
layout) attend everything and are attended by everything.  Pairs allowed: ``block[q // B, k // B]``.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import torch

from ..errors import InvalidArgument
from .base import Mask, Shape, check_int

SPLIT_THRESHOLD = 128  # the reference's hard-coded block size in get_diagonal_split_mask


def radial(frames: int, block_size: int = 128, decay_factor: float = 1.0, sink: bool = False, text: int = 0) -> Mask:
    """Radial attention over ``frames`` equal frames (+ ``text`` dense tokens after them); see the module doc."""
    frames = check_int("frames", frames, low=1)
    block_size = check_int("block_size", block_size, low=1)
    text = check_int("text", text, low=0)
    if (
        isinstance(decay_factor, bool)
        or not isinstance(decay_factor, numbers.Real)
        or not math.isfinite(decay_factor)
        or decay_factor <= 0
    ):
        raise InvalidArgument(
            f"decay_factor must be a finite number > 0 (the reference uses 0.2 to 1), got {decay_factor!r}"
        )
    if not isinstance(sink, bool):
        raise InvalidArgument(f"sink must be a bool (True: every frame attends frame 0, as Wan does), got {sink!r}")
    decay_factor = float(decay_factor)
    name = f"radial_f{frames}_b{block_size}" + (f"_decay{decay_factor:g}" if decay_factor != 1 else "")
    name += ("_sink" if sink else "") + (f"_text{text}" if text else "")

    def mods(shape: Shape):
        n = shape.q_len
        if shape.kv_len != n or (shape.grid is not None and len(shape.grid) > 1):
            raise InvalidArgument(
                "radial needs one frame-major sequence of queries = keys (seq_len=frames x tokens "
                f"per frame + text), got q_len={shape.q_len}, kv_len={shape.kv_len}, "
                f"grid={shape.grid}"
            )
        video = n - text
        if video < frames or video % frames:
            raise InvalidArgument(
                f"radial: {n} tokens minus text={text} must split into frames={frames} equal frames, "
                f"got {video} video tokens; pass seq_len = frames x tokens_per_frame + text"
            )
        if video % block_size:
            raise InvalidArgument(
                f"radial: the {video} video tokens must be whole blocks of block_size={block_size} "
                "(the reference's block mask covers whole blocks only); pick a block_size dividing "
                "it"
            )
        blocks = _block_mask(frames, video // frames, block_size, decay_factor, sink)

        def mask_mod(b, h, q_idx, kv_idx):
            inside = blocks[q_idx.clamp(max=video - 1) // block_size, kv_idx.clamp(max=video - 1) // block_size]
            return inside | (q_idx >= video) | (kv_idx >= video)

        return mask_mod, None

    # Queries of one block share their keys exactly: one block per tile keeps block tables free of padding rows.
    return Mask(name, mods, {"tile": block_size})


@lru_cache(maxsize=16)
def _block_mask(frames: int, per_frame: int, block: int, decay: float, sink: bool) -> torch.Tensor:
    """(video blocks, video blocks) bool: the union over frame pairs of their coarsened token masks."""
    n_blocks, span = frames * per_frame // block, -(-per_frame // block)
    out = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    pairs = {}  # the coarsened pair mask depends only on (distance, row offset, column offset, sink)
    for i in range(frames):
        for j in range(frames):
            key = (abs(i - j), i * per_frame % block, j * per_frame % block, sink and j == 0)
            if key not in pairs:
                pairs[key] = _coarsen(_pair_mask(per_frame, key[0], block, decay, key[3]), key[1], key[2], block, span)
            r, c = i * per_frame // block, j * per_frame // block
            out[r : r + span, c : c + span] |= pairs[key]
    return out


def _pair_mask(per_frame: int, distance: int, block: int, decay: float, sink: bool) -> torch.Tensor:
    """The (T, T) token mask of one frame pair, before coarsening."""
    if sink:
        return torch.ones(per_frame, per_frame, dtype=torch.bool)
    length = 2 ** per_frame.bit_length() / 2 ** distance.bit_length()
    if length < SPLIT_THRESHOLD and distance % int(SPLIT_THRESHOLD / length):
        return torch.zeros(per_frame, per_frame, dtype=torch.bool)
    width = per_frame if distance <= 1 else max(length * decay, block)
    pos = torch.arange(per_frame)
    return (pos[:, None] - pos[None, :]).abs() <= width


def _coarsen(local: torch.Tensor, row_offset: int, col_offset: int, block: int, span: int) -> torch.Tensor:
    """Place ``local`` at its offsets in a (span x span)-block canvas and keep the blocks dense enough."""
    side = span * block
    canvas = torch.zeros(side, side, dtype=torch.bool)
    rows, cols = min(local.shape[0], side - row_offset), min(local.shape[1], side - col_offset)
    canvas[row_offset : row_offset + rows, col_offset : col_offset + cols] = local[:rows, :cols]
    counts = canvas.view(span, block, span, block).sum(1)  # (row block, col block, column): rows set
    # integer forms of the reference's float tests: count / block > 1/3 and high / non-empty > 0.6
    high = (3 * counts > block).sum(-1)
    nonempty = (counts > 0).sum(-1)
    return 5 * high > 3 * nonempty
