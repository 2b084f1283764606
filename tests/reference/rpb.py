"""Learned relative position bias indices, as the references compute them.

NATTEN (github.com/SHI-Labs/NATTEN v0.17.5, csrc/include/natten/cpu/naive/natten_cpu_commons.h and
pointwise_neighborhood_*d.hpp): for query i the kernel visits keys ``start + ki * d`` (``get_window_start``) and adds
``rpb[h, pb_start + ki]`` (``get_pb_start``), per axis.  Swin (github.com/microsoft/Swin-Transformer,
models/swin_transformer.py): the map is rolled by -shift and cut into windows; inside a window, query a and key b
get ``relative_position_index[a, b] = (ya - yb + Wh - 1)(2Ww - 1) + (xa - xb + Ww - 1)``.
"""

import itertools
import math

import torch

from .masks import coords


def natten_window_start(i, length, k, d):
    """First key NATTEN's kernel visits for query ``i`` on one axis (get_window_start; kernel k, dilation d)."""
    half, group, i_g = k // 2, i % d, i // d
    length_g = -(-length // d) - (1 if group >= d - (-(-length // d) * d - length) else 0)
    start = max(i_g - half, 0) + (length_g - i_g - half - 1 if i_g + half >= length_g else 0)
    return start * d + group


def natten_pb_start(i, length, k, d):
    """Position in the (2k - 1) rpb row of the first visited key for query ``i`` on one axis (NATTEN's
    get_pb_start)."""
    half = k // 2
    if d <= 1:
        return half + (half - i if i < half else 0) + (length - i - 1 - half if i + half >= length else 0)
    if i - half * d < 0:
        return k - 1 - i // d
    if i + half * d >= length:
        return (length - i - 1) // d
    return half


def flat(coords, sizes):
    """Row-major flat index of ``coords`` in an array of shape ``sizes``."""
    flat = 0
    for c, s in zip(coords, sizes):
        flat = flat * s + c
    return flat


def natten_index_loop(grid, kernel, dilation):
    """(N, N) table position of each visited (query, key) pair, -1 for pairs the kernel does not visit (NATTEN's
    naive kernels, per axis window start and pb start)."""
    n = math.prod(grid)
    out = torch.full((n, n), -1, dtype=torch.long)
    sizes = [2 * k - 1 for k in kernel]
    for q in range(n):
        at = coords(q, grid)
        starts = [natten_window_start(c, L, k, d) for c, L, k, d in zip(at, grid, kernel, dilation)]
        pbs = [natten_pb_start(c, L, k, d) for c, L, k, d in zip(at, grid, kernel, dilation)]
        for steps in itertools.product(*[range(k) for k in kernel]):
            key = flat([s + t * d for s, t, d in zip(starts, steps, dilation)], grid)
            out[q, key] = flat([p + t for p, t in zip(pbs, steps)], sizes)
    return out


def swin_index_loop(grid, size, shift):
    """(N, N) Swin relative_position_index of each same-window pair after the roll by -shift; -1 for pairs in
    different windows or (shifted) in different regions (Swin's -100 there).

    Roll the token ids by -shift, partition into windows, give each same-window pair Swin's index."""
    (H, W), (wh, ww), (sh, sw) = grid, size, shift
    tokens = torch.roll(torch.arange(H * W).view(H, W), shifts=(-sh, -sw), dims=(0, 1))
    region = torch.zeros(H, W, dtype=torch.long)
    for axis, (length, w, s) in enumerate(zip(grid, size, shift)):
        if s:
            r = torch.zeros(length, dtype=torch.long)
            r[length - w : length - s], r[length - s :] = 1, 2
            region = region * 3 + (r[:, None] if axis == 0 else r[None, :])
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    relative = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
    out = torch.full((H * W, H * W), -1, dtype=torch.long)
    for top in range(0, H, wh):
        for left in range(0, W, ww):
            ids = tokens[top : top + wh, left : left + ww].flatten()
            labels = region[top : top + wh, left : left + ww].flatten()
            out[ids[:, None], ids[None, :]] = torch.where(labels[:, None] == labels[None, :], relative, -1)
    return out


def swin_relative_position_index(w):
    """Swin's ``relative_position_index`` buffer (w*w, w*w) for a square window, computed from window coordinates
    the reference's way."""
    ys, xs = torch.arange(w * w) // w, torch.arange(w * w) % w
    return (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
