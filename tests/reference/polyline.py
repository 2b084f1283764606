"""Polyline path sums (PPMA, Polyline Path Masked Attention), written from the definition with plain loops."""


def segment(values, i, j):
    """Sum of values[k] for min(i, j) < k <= max(i, j): walk one step at a time from i to j; going up add the
    position stepped onto, going down the position left (so the lower end is never counted)."""
    total, pos = 0.0, i
    while pos < j:
        pos += 1
        total += values[pos]
    while pos > j:
        total += values[pos]
        pos -= 1
    return total


def naive_1d(decay):
    """(L, L) PPMA 1-D mask of one line: entry (i, j) is the :func:`segment` sum of ``decay`` from i to j."""
    L = len(decay)
    return [[segment(decay, i, j) for j in range(L)] for i in range(L)]


def naive_2d(row_decay, col_decay, first):
    """(HW, HW) PPMA 2-D mask: walk the polyline from query (a, p) to key (b, q), summing each leg with the 1-D rule
    of its line (``first`` = "row": along the row first, "column": along the column first)."""
    H, W = len(row_decay), len(row_decay[0])
    out = [[0.0] * (H * W) for _ in range(H * W)]
    for a in range(H):
        for p in range(W):
            for b in range(H):
                for q in range(W):
                    if first == "row":  # along row a from column p to q, then along column q from row a to b
                        total = segment(row_decay[a], p, q) + segment([r[q] for r in col_decay], a, b)
                    else:  # along column p from row a to b, then along row b from column p to q
                        total = segment([r[p] for r in col_decay], a, b) + segment(row_decay[b], p, q)
                    out[a * W + p][b * W + q] = total
    return out
