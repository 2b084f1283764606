"""Attention written out with explicit softmax and loops: masked attention as edgeattn defines it, and the
references' attention (NATTEN's neighborhood attention, PPMA's two forms) on top of the other reference modules."""

import torch

from .polyline import naive_1d, naive_2d
from .rpb import natten_pb_start, natten_window_start


def naive_attention(q, k, v, mask, bias, scale, softcap=None):
    """Row-by-row softmax over the allowed keys only; rows without keys are zeros (float64; mask and bias
    (heads or 1, Nq, Nkv), head h reads entry h mod their head count); ``softcap`` caps the scaled scores with
    softcap * tanh(s / softcap) before the bias (Gemma 2's order)."""
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = mask[h % mask.shape[0], i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = (q[b, h, i].double() @ k[b, h, keys].double().T) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if bias is not None:
                    s = s + bias[h % bias.shape[0], i, keys].double()
                out[b, h, i] = torch.softmax(s, -1) @ v[b, h, keys].double()
    return out


def natten_attention(q, k, v, rpb, grid, kernel, dilation):
    """NeighborhoodAttention2D's math (NATTEN 0.17 naive kernels): q*scale . k over the visited keys + rpb, softmax."""
    (H, W), N = grid, grid[0] * grid[1]
    keys, bias = torch.zeros(N, kernel * kernel, dtype=torch.long), torch.zeros(N, kernel * kernel, dtype=torch.long)
    for i in range(H):
        for j in range(W):
            ni, nj = natten_window_start(i, H, kernel, dilation), natten_window_start(j, W, kernel, dilation)
            pi, pj = natten_pb_start(i, H, kernel, dilation), natten_pb_start(j, W, kernel, dilation)
            for ki in range(kernel):
                for kj in range(kernel):
                    keys[i * W + j, ki * kernel + kj] = (ni + ki * dilation) * W + nj + kj * dilation
                    bias[i * W + j, ki * kernel + kj] = (pi + ki) * (2 * kernel - 1) + pj + kj
    scores = torch.einsum("bhnd,bhnkd->bhnk", q * q.shape[-1] ** -0.5, k[:, :, keys]) + rpb.flatten(1)[:, bias]
    return torch.einsum("bhnk,bhnkd->bhnd", scores.softmax(-1), v[:, :, keys])


def ppma_attention(q, k, v, row_decay, col_decay, chunk):
    """PPMA's attention (the reference's formulas) with explicit softmax matrices and naive path sums, for one batch
    element and head: q, k, v (H, W, d), decays (H, W) -> (H, W, d); ``chunk`` selects the separable form."""
    H, W, d = q.shape
    rows = row_decay.tolist()
    columns = col_decay.T.tolist()  # columns[c]: column c's decays, top to bottom
    if not chunk:
        scores = q.reshape(H * W, d) @ k.reshape(H * W, d).T
        M = torch.tensor(naive_2d(rows, col_decay.tolist(), "row"), dtype=q.dtype)
        P = 0.5 * torch.softmax(scores + M, -1) + 0.5 * torch.softmax(scores + M.T, -1)
        return (P @ v.reshape(H * W, d)).reshape(H, W, d)
    # one W x W softmax per row (its row's 1-D mask), one H x H softmax per column (its column's)
    A_row = [torch.softmax(q[r] @ k[r].T + torch.tensor(naive_1d(rows[r]), dtype=q.dtype), -1) for r in range(H)]
    A_col = [
        torch.softmax(q[:, c] @ k[:, c].T + torch.tensor(naive_1d(columns[c]), dtype=q.dtype), -1) for c in range(W)
    ]
    along_rows = lambda t: torch.stack([A_row[r] @ t[r] for r in range(H)])  # noqa: E731
    along_cols = lambda t: torch.stack([A_col[c] @ t[:, c] for c in range(W)], dim=1)  # noqa: E731
    return 0.5 * along_cols(along_rows(v)) + 0.5 * along_rows(along_cols(v))
