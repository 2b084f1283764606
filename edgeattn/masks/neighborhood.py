"""Neighborhood attention (NAT / DiNAT) on 1-D, 2-D and 3-D token grids, with NATTEN's exact semantics.

Reference: NATTEN (github.com/SHI-Labs/NATTEN), ``src/natten/backends/flex.py`` (get_na_flex_mask),
``csrc/include/natten/cuda/reference/mask.hpp`` and ``src/natten/utils/checks.py``.

Per axis of length L, with kernel k, dilation d, stride s, for query coordinate i and key coordinate j:
- dilation splits the axis into d interleaved groups; i and j must share a group (``i % d == j % d``) and all
  positions below are taken inside the group (``i // d``), whose length is ``ceil((L - i % d) / d)``;
- queries are tiled into stride blocks of s; every query of a block uses the window of the block's leader;
- non-causal: the window holds ``k // 2`` keys before its centre and ``(k - 1) // 2`` after (even k leans left);
  the centre is clamped so the window **shifts** at borders and every query sees exactly k keys;
- causal: keys from ``max(leader - k + 1, 0)`` up to the query itself (no shift: early queries see fewer keys).
A key is allowed iff it is allowed on every axis.  Flat indices are row-major over the grid.

``rpb=True`` adds NAT's learned relative position bias, a per-head table of shape (2k-1, ...) per axis, indexed
as NATTEN's kernels index it (``rel_pos_bias_*d`` / ``get_pb_start`` in ``csrc/include/natten/cpu/naive``,
NATTEN <= 0.17): the bias of key j for query i sits at ``j // d - i // d + k - 1`` on each axis, i.e. it follows the
key's offset from the query inside the dilation group, also where the window shifts at a border.  NATTEN defines
it for odd kernels, stride 1 and non-causal axes only, so other combinations are refused.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from .base import Mask, Shape, axis_coords, fmt_axes, per_axis


def neighborhood(kernel, dilation=1, stride=1, causal=False, rpb=False) -> Mask:
    """NATTEN neighborhood attention; each argument is an int or a per-axis tuple.  ``rpb=True``: with NAT's
    learned relative position bias (a per-head (2k-1, ...) table)."""
    ndim = next((len(a) for a in (kernel, dilation, stride, causal) if isinstance(a, (tuple, list))), None)

    def resolve(nd):
        ks = per_axis("kernel", kernel, nd, low=2)
        ds = per_axis("dilation", dilation, nd, low=1)
        ss = per_axis("stride", stride, nd, low=1)
        cs = tuple(causal) if isinstance(causal, (tuple, list)) else (causal,) * nd
        if len(cs) != nd or not all(isinstance(c, bool) for c in cs):
            raise InvalidArgument(f"causal must be a bool or {nd} bools, got {causal!r}")
        for k, s in zip(ks, ss):
            if s > k:
                raise InvalidArgument(f"stride must be in [1, kernel={k}], got {s}")
        return ks, ds, ss, cs

    ks, ds, ss, cs = resolve(ndim or 1)  # validates types now; per-axis lengths are checked against the grid later
    if not isinstance(rpb, bool):
        raise InvalidArgument(f"rpb must be True or False, got {rpb!r}")
    if rpb and (any(k % 2 == 0 for k in ks) or any(s > 1 for s in ss) or any(cs)):
        raise InvalidArgument(
            f"rpb=True needs odd kernels, stride 1 and no causal axis (where NATTEN defines relative "
            f"position biases), got kernel={kernel}, stride={stride}, causal={causal}"
        )
    name = "neighborhood_k" + fmt_axes(ks)
    name += "_d" + fmt_axes(ds) if any(d > 1 for d in ds) else ""
    name += "_s" + fmt_axes(ss) if any(s > 1 for s in ss) else ""
    name += "_causal" + ("" if all(cs) else "".join("1" if c else "0" for c in cs)) if any(cs) else ""
    name += "_rpb" if rpb else ""

    def checked(shape: Shape):
        """The grid and the per-axis (kernels, dilations, strides, causal) for it."""
        grid = shape.require_grid("neighborhood", (ndim,) if ndim else (1, 2, 3))
        axes = resolve(len(grid))
        for axis, (length, k, d) in enumerate(zip(grid, axes[0], axes[1])):
            if k * d > length:
                raise InvalidArgument(
                    f"kernel*dilation must be <= the grid axis length: axis {axis} has length "
                    f"{length}, kernel {k} x dilation {d} = {k * d}; lower kernel or dilation"
                )
        return grid, axes

    def mods(shape: Shape):
        grid, axes = checked(shape)

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = None
            for qi, kj, length, k, d, s, c in zip(axis_coords(q_idx, grid), axis_coords(kv_idx, grid), grid, *axes):
                ok = _axis_allowed(qi, kj, length, k, d, s, c)
                allowed = ok if allowed is None else allowed & ok
            return allowed

        return mask_mod, None

    def rpb_mods(shape: Shape):
        grid, (kernels, dilations, *_) = checked(shape)
        table = tuple(2 * k - 1 for k in kernels)

        def group_position(idx):  # row-major position of the token's dilation-group coordinates in the table
            flat = 0
            for coord, d, size in zip(axis_coords(idx, grid), dilations, table):
                flat = flat * size + coord // d
            return flat

        centre = 0  # table position of a zero offset: (k-1, k-1, ...)
        for k, size in zip(kernels, table):
            centre = centre * size + k - 1

        def rpb_index_mod(b, h, q_idx, kv_idx):
            # row-major position of (j // d - i // d + k - 1) per axis, summed on the small q and kv tensors so only
            # one full (Nq, Nkv) subtraction is computed (tables evaluate this over millions of pairs)
            return (group_position(kv_idx) + centre) - group_position(q_idx)

        return table, rpb_index_mod

    # Tiles of one kernel per axis inside one dilation group: a tile's keys span about 2 kernels per axis.
    return Mask(name, mods, {"tile": ks if ndim else ks[0], "groups": ds if ndim else ds[0]}, rpb_mods if rpb else None)


def _axis_allowed(i, j, length, k, d, s, causal):
    group = i % d
    group_len = (length - group + d - 1) // d
    q, p = i // d, j // d
    block_start = (q // s) * s
    if causal:
        leader = torch.minimum(block_start + s - 1, group_len - 1)
        inside = (p >= (leader - k + 1).clamp(min=0)) & (p <= q)
    else:
        before, after = k // 2, (k - 1) // 2
        leader = torch.minimum(block_start + s // 2, group_len - 1)
        centre = torch.minimum(leader.clamp(min=before), group_len - 1 - after)
        inside = (p >= centre - before) & (p <= centre + after)
    return inside & (j % d == group)
