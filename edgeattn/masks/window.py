"""Swin Transformer windows and shifted windows on a 2-D token grid, expressed as a mask on the unshifted grid.

Reference: Swin Transformer (github.com/microsoft/Swin-Transformer, ``models/swin_transformer.py``:
SwinTransformerBlock's cyclic shift and attn_mask).  Swin rolls the map by ``-shift``, cuts it into windows and,
in the last window row/column, separates the three regions the roll glued together (slices ``[0, L-size)``,
``[L-size, L-shift)``, ``[L-shift, L)`` of the rolled axis).  On the original grid that is: two tokens attend iff
their rolled coordinates fall in the same window and the same region on both axes.  Swin adds -100 to the
scores of other regions; we mask them, which differs by at most exp(-100).
"""
from __future__ import annotations

from .base import Mask, Shape, axis_coords, fmt_axes, per_axis


def window(size, shift=0) -> Mask:
    """Non-overlapping ``size`` windows (int or (h, w)); ``shift`` > 0 gives Swin's shifted windows."""
    sizes = per_axis("size", size, 2, low=1)
    shifts = per_axis("shift", shift, 2, low=0)
    for s, w in zip(shifts, sizes):
        if s >= w:
            raise ValueError(f"shift must be in [0, size-1={w - 1}], got {s}")
    name = f"window_{fmt_axes(sizes)}" + (f"_shift{fmt_axes(shifts)}" if any(shifts) else "")

    def mods(shape: Shape):
        grid = shape.require_grid("window", (2,))
        for axis, (length, w) in enumerate(zip(grid, sizes)):
            if length % w:
                raise ValueError(f"window size {w} must divide grid axis {axis} of length {length}; "
                                 f"pad the feature map to a multiple of the window (as Swin does)")

        def labels(idx):
            out = []
            for coord, length, w, s in zip(axis_coords(idx, grid), grid, sizes, shifts):
                rolled = (coord - s) % length
                region = (rolled >= length - w).long() + (rolled >= length - s).long() if s else 0 * rolled
                out.append((rolled // w, region))
            return out

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = None
            for (wq, rq), (wk, rk) in zip(labels(q_idx), labels(kv_idx)):
                ok = (wq == wk) & (rq == rk)
                allowed = ok if allowed is None else allowed & ok
            return allowed

        return mask_mod, None

    return Mask(name, mods, {"tile": sizes, "offset": shifts})   # one tile per (shifted) window
