"""Swin Transformer windows and shifted windows on a 2-D token grid, expressed as a mask on the unshifted grid.

Reference: Swin Transformer (github.com/microsoft/Swin-Transformer, ``models/swin_transformer.py``:
SwinTransformerBlock's cyclic shift and attn_mask).  Swin rolls the map by ``-shift``, cuts it into windows and,
in the last window row/column, separates the three regions the roll glued together (slices ``[0, L-size)``,
``[L-size, L-shift)``, ``[L-shift, L)`` of the rolled axis).  On the original grid that is: two tokens attend iff
their rolled coordinates fall in the same window and the same region on both axes.  Swin adds -100 to the
scores of other regions; we mask them, which differs by at most exp(-100).

``rpb=True`` adds Swin's learned relative position bias (WindowAttention's relative_position_bias_table, a per-head
table of (2Wh-1)(2Ww-1) entries): a pair's entry is ``(dy + Wh-1)(2Ww-1) + (dx + Ww-1)`` with (dy, dx) the query's
position minus the key's inside their (rolled) window, which is Swin's relative_position_index.
"""

from __future__ import annotations

from ..errors import InvalidArgument
from .base import Mask, Shape, axis_coords, fmt_axes, per_axis


def window(size, shift=0, rpb=False) -> Mask:
    """Non-overlapping ``size`` windows (int or (h, w)); ``shift`` > 0 gives Swin's shifted windows; ``rpb=True``
    adds Swin's learned relative position bias."""
    sizes = per_axis("size", size, 2, low=1)
    shifts = per_axis("shift", shift, 2, low=0)
    for s, w in zip(shifts, sizes):
        if s >= w:
            raise InvalidArgument(f"shift must be in [0, size-1={w - 1}], got {s}")
    if not isinstance(rpb, bool):
        raise InvalidArgument(f"rpb must be True or False, got {rpb!r}")
    name = f"window_{fmt_axes(sizes)}" + (f"_shift{fmt_axes(shifts)}" if any(shifts) else "") + ("_rpb" if rpb else "")

    def checked_grid(shape: Shape):
        grid = shape.require_grid("window", (2,))
        for axis, (length, w) in enumerate(zip(grid, sizes)):
            if length % w:
                raise InvalidArgument(
                    f"window size {w} must divide grid axis {axis} of length {length}; "
                    f"pad the feature map to a multiple of the window (as Swin does)"
                )
        return grid

    def mods(shape: Shape):
        grid = checked_grid(shape)

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

    def rpb_mods(shape: Shape):
        grid = checked_grid(shape)
        wh, ww = sizes

        def position(idx):  # (y, x) inside the window of the rolled map, as y * (2Ww-1) + x
            y, x = ((c - s) % length % w for c, length, w, s in zip(axis_coords(idx, grid), grid, sizes, shifts))
            return y * (2 * ww - 1) + x

        def rpb_index_mod(b, h, q_idx, kv_idx):
            # (dy + Wh-1)(2Ww-1) + (dx + Ww-1), summed on the small q and kv tensors: one full (Nq, Nkv) subtraction
            return (position(q_idx) + (wh - 1) * (2 * ww - 1) + ww - 1) - position(kv_idx)

        return ((2 * wh - 1) * (2 * ww - 1),), rpb_index_mod

    # one tile per (shifted) window
    return Mask(name, mods, {"tile": sizes, "offset": shifts}, rpb_mods if rpb else None)
