"""Boolean masks, brute force from the references' rules (scalar logic, no package code): ``[q][kv]`` lists of lists
of bools or bool tensors, True where the query may attend the key."""

import math

import torch


def axis_tuple(v, nd):
    """``v`` as a per-axis tuple of length ``nd`` (a scalar repeated), the way the mask factories read parameters."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def coords(idx, grid):
    """Row-major coordinates of flat token ``idx`` on ``grid`` (the last axis varies fastest)."""
    out = []
    for length in reversed(grid):
        out.append(idx % length)
        idx //= length
    return out[::-1]


def natten_axis(i, j, L, k, d, s, c):
    """Whether query ``i`` attends key ``j`` along one axis of length L: NATTEN's neighborhood rule (kernel k,
    dilation d, stride s, causal c; window shifted at borders, even kernels lean left, stride groups share their
    leader's window)."""
    if i % d != j % d:
        return False
    g = i % d
    Lg = -(-(L - g) // d)
    q, p = i // d, j // d
    if c:
        leader = min((q // s) * s + s - 1, Lg - 1)
        return max(leader - k + 1, 0) <= p <= q
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = min((q // s) * s + s // 2, Lg - 1)
    centre = min(max(leader, left), Lg - 1 - right)
    return centre - left <= p <= centre + right


def ref_neighborhood(grid, k, d=1, s=1, c=False):
    """(N, N) NATTEN neighborhood mask on ``grid``: a pair is allowed when :func:`natten_axis` allows every axis."""
    nd, n = len(grid), math.prod(grid)
    axes = list(zip(grid, axis_tuple(k, nd), axis_tuple(d, nd), axis_tuple(s, nd), axis_tuple(c, nd)))
    co = [coords(x, grid) for x in range(n)]
    return [
        [all(natten_axis(qi, kj, *ax) for qi, kj, ax in zip(co[q], co[kv], axes)) for kv in range(n)] for q in range(n)
    ]


def swin_labels(coord, L, size, shift):
    """(window, region) label of one coordinate along an axis of length L: Swin's roll by -shift, then its 3 regions
    (SwinTransformerBlock's img_mask slices)."""
    rolled = (coord - shift) % L
    region = 0 if shift == 0 else (0 if rolled < L - size else 1 if rolled < L - shift else 2)
    return rolled // size, region


def ref_window(grid, size, shift):
    """(N, N) Swin (shifted) window mask on a 2-D grid: allowed when both tokens share window and region labels."""
    sizes, shifts, n = axis_tuple(size, 2), axis_tuple(shift, 2), math.prod(grid)
    lab = [[swin_labels(c, *a) for c, a in zip(coords(x, grid), zip(grid, sizes, shifts))] for x in range(n)]
    return [[lab[q] == lab[kv] for kv in range(n)] for q in range(n)]


def swin_literal(grid, size, shift):
    """(N, N) bool tensor doing what Swin does: roll tokens by -shift, label the 3x3 regions, partition into
    windows, map back."""
    (H, W), (sh, sw), (th, tw) = grid, axis_tuple(size, 2), axis_tuple(shift, 2)
    img = torch.zeros(H, W, dtype=torch.long)
    sl = lambda w, t: (slice(0, -w), slice(-w, -t), slice(-t, None)) if t else (slice(None),)  # noqa: E731
    cnt = 0
    for hs in sl(sh, th):
        for ws in sl(sw, tw):
            img[hs, ws] = cnt
            cnt += 1
    tok = torch.roll(torch.arange(H * W).view(H, W), shifts=(-th, -tw), dims=(0, 1))
    out = torch.zeros(H * W, H * W, dtype=torch.bool)
    for a in range(0, H, sh):
        for b in range(0, W, sw):
            t, lab = tok[a : a + sh, b : b + sw].reshape(-1), img[a : a + sh, b : b + sw].reshape(-1)
            out[t[:, None], t[None, :]] = lab[:, None] == lab[None, :]
    return out


def swin_attn_mask(res, w, shift):
    """Swin's ``attn_mask`` buffer (windows, w*w, w*w) for a square map of side ``res``, computed the reference's
    way: the 3x3 region labels of the rolled map, partitioned into windows, -100 between different labels."""
    band = torch.zeros(res, dtype=torch.long)
    band[res - w : res - shift], band[res - shift :] = 1, 2
    labels = band[:, None] * 3 + band[None, :]  # rolled map, (res, res)
    windows = labels.reshape(res // w, w, res // w, w).transpose(1, 2).reshape(-1, w * w)
    return torch.where(windows[:, :, None] == windows[:, None, :], 0.0, -100.0)


def ref_seq(pred, q_len, kv_len):
    """(q_len, kv_len) sequence mask from a predicate on (query position, key): the q_len queries sit at the end
    of the kv_len keys (query i at position i + kv_len - q_len)."""
    off = kv_len - q_len
    return [[pred(i + off, k) for k in range(kv_len)] for i in range(q_len)]


def ref_radial(frames, per_frame, block, decay=1.0, sink=False, text=0):
    """(N, N) bool tensor of Radial Attention's mask (gen_log_mask_shrinked) over frames * per_frame video tokens
    then ``text`` tokens that attend and are attended everywhere.

    Per frame pair: token mask, placed at its block offset on a padded canvas, cut to ceil(T/B) blocks, each
    block kept when > 60% of its non-empty columns are > 1/3 full (float tests, as the reference writes them)."""
    video = frames * per_frame
    nb, span = video // block, (per_frame - 1) // block + 1
    keep = [[False] * nb for _ in range(nb)]
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if sink and j == 0:

                def local(r, c):
                    return True
            else:
                base = 2 ** per_frame.bit_length() / 2 ** d.bit_length()
                width = per_frame if d <= 1 else (base * decay if base * decay >= block else block)
                split = base >= 128 or d % int(128 / base) == 0

                def local(r, c, width=width, split=split):
                    return split and abs(c - r) <= width

            ro, co = i * per_frame % block, j * per_frame % block
            for a in range(span):
                for b in range(span):
                    dens = []
                    for col in range(block):
                        c = b * block + col - co
                        count = sum(
                            1
                            for row in range(block)
                            if 0 <= a * block + row - ro < per_frame
                            and 0 <= c < per_frame
                            and local(a * block + row - ro, c)
                        )
                        dens.append(count / block)
                    nonzero, high = sum(x > 0 for x in dens), sum(x > 1 / 3 for x in dens)
                    if high / (nonzero + 1e-9) > 0.6:
                        keep[i * per_frame // block + a][j * per_frame // block + b] = True
    n = video + text
    return torch.tensor(
        [[q >= video or k >= video or keep[q // block][k // block] for k in range(n)] for q in range(n)]
    )


def ref_clear(radius, text, height, width, q_len=None):
    """Bool tensor of CLEAR's local_mask over text + H*W tokens (text attends everywhere, image pairs within a disc
    of ``radius``); with q_len, the last q_len query rows."""
    n = text + height * width

    def allowed(q, k):
        if q < text or k < text:
            return True
        (qy, qx), (ky, kx) = divmod(q - text, width), divmod(k - text, width)
        return (qy - ky) ** 2 + (qx - kx) ** 2 < radius**2

    rows = range(n - (q_len or n), n)
    return torch.tensor([[allowed(q, k) for k in range(n)] for q in rows])
