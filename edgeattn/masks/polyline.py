"""Polyline path masks (PPMA): additive attention biases computed in the graph from input-dependent decays.

Reference: Zhao et al., "Polyline Path Masked Attention for Vision Transformer" (NeurIPS 2025),
github.com/zhongchenzhao/PPMA (``classification/models/PPMA.py``: ``PathEmbeding2D.generate_structed_mask_1d``
and ``PathEmbeding2D.forward``).

Each token of an (H, W) grid carries two decays (PPMA: ``a = -softplus(Linear(x) + dt_bias) * exp(A_log)``, one
for horizontal and one for vertical moves).  On a line, the bias between positions i and j is the sum of the decays
strictly after the first and up to the second: ``M1[i, j] = sum(a[k] for min(i,j) < k <= max(i,j))``, i.e.
``C[max] - C[min]`` with ``C = cumsum(a)`` (``-|C[i] - C[j]|`` for the nonpositive decays PPMA produces).

On the grid the path from query (a, p) to key (b, q) is a polyline: along the query's row a from column p to q
(row decays of row a), then along the key's column q from row a to b (column decays of column q).  The other
orientation (first along the query's column p, then along the key's row b) is the transpose of that mask.

The structure is static (broadcast shapes fixed by the grid), the values are computed from the decays at run time
with a cumsum and broadcast adds: nothing of size (H*W)^2 is stored.  The masks are not a static ``Mask`` family
(``mask_mod`` / ``bias_mod`` over indices) because they depend on the input; pass them to
``edgeattn.attention.masked_attention`` as ``bias``.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument

ORIENTATIONS = ("row", "column")


def path_sums(decay: torch.Tensor) -> torch.Tensor:
    """1-D path mask: decays (..., L) -> (..., L, L) with ``M[i, j]`` = sum of ``decay`` over (min(i,j), max(i,j)].

    For i >= j that is C[i] - C[j]; for i < j, C[j] - C[i] = -(C[i] - C[j]): one difference table and its sign."""
    _check_decay("decay", decay, 1)
    c = decay.cumsum(-1)
    diff = c[..., :, None] - c[..., None, :]
    pos = torch.arange(decay.shape[-1], device=decay.device)
    return torch.where(pos[:, None] >= pos[None, :], diff, -diff)


def line_biases(row_decay: torch.Tensor, col_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row and per-column 1-D masks of decays laid on the grid, both (..., H, W).

    Returns ``rows`` (..., H, W, W) (``rows[..., a, p, q]``: along row a from column p to q) and ``cols``
    (..., W, H, H) (``cols[..., c, a, b]``: along column c from row a to b), what PPMA's chunk mode adds to its
    row and column attentions."""
    _check_pair(row_decay, col_decay)
    return path_sums(row_decay), path_sums(col_decay.transpose(-1, -2))


def polyline_bias(row_decay: torch.Tensor, col_decay: torch.Tensor, first: str = "row") -> torch.Tensor:
    """2-D polyline mask over the H*W tokens (row-major): decays (..., H, W) -> (..., H*W, H*W).

    ``first="row"``: ``M[(a,p), (b,q)] = rows[a, p, q] + cols[q, a, b]`` (the query's row, then the key's column).
    ``first="column"``: ``M[(a,p), (b,q)] = cols[p, a, b] + rows[b, p, q]`` (the query's column, then the key's
    row), the transpose of the ``"row"`` mask.  Both come from broadcast adds of the 1-D masks."""
    if first not in ORIENTATIONS:
        raise InvalidArgument(
            f"first must be one of {ORIENTATIONS} (which line the path from the query follows first), got {first!r}"
        )
    rows, cols = line_biases(row_decay, col_decay)
    H, W = row_decay.shape[-2:]
    if first == "row":
        # axes (a, p, b, q): rows[a, p, q] is constant over b; cols[q, a, b] over p
        full = rows.unsqueeze(-2) + cols.permute(*range(cols.ndim - 3), -2, -1, -3).unsqueeze(-3)
    else:
        # cols[p, a, b] -> (a, p, b), constant over q; rows[b, p, q] -> (p, b, q), constant over a
        full = rows.transpose(-3, -2).unsqueeze(-4) + cols.transpose(-3, -2).unsqueeze(-1)
    return full.reshape(*full.shape[:-4], H * W, H * W)


def _check_decay(name: str, decay, min_ndim: int) -> None:
    if not isinstance(decay, torch.Tensor) or not decay.is_floating_point() or decay.ndim < min_ndim:
        got = (
            f"{decay.dtype} tensor of shape {tuple(decay.shape)}"
            if isinstance(decay, torch.Tensor)
            else type(decay).__name__
        )
        raise InvalidArgument(
            f"{name} must be a floating-point tensor with at least {min_ndim} dimension(s) "
            f"(..., {'H, W' if min_ndim == 2 else 'L'}), got {got}"
        )


def _check_pair(row_decay, col_decay) -> None:
    _check_decay("row_decay", row_decay, 2)
    _check_decay("col_decay", col_decay, 2)
    if row_decay.shape != col_decay.shape:
        raise InvalidArgument(
            f"row_decay and col_decay must both be laid on the grid with the same shape (..., H, W), "
            f"got {tuple(row_decay.shape)} and {tuple(col_decay.shape)}"
        )
