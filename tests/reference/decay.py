"""Retention decay biases (RMT, github.com/qhfan/RMT): log(gamma) times a distance, looped over every pair, float64."""

import itertools
import math

import torch


def brute_manhattan(grid, gammas):
    """(heads, N, N) float64 RMT 2-D decay bias: log(gamma_h) * Manhattan distance between row-major grid cells."""
    cells = list(itertools.product(*[range(n) for n in grid]))  # row-major, like the flat token index
    out = torch.empty(len(gammas), len(cells), len(cells), dtype=torch.float64)
    for h, g in enumerate(gammas):
        for i, a in enumerate(cells):
            for j, b in enumerate(cells):
                out[h, i, j] = math.log(g) * sum(abs(x - y) for x, y in zip(a, b))
    return out


def brute_1d(q_len, kv_len, gammas):
    """(heads, q_len, kv_len) float64 RMT 1-D decay bias: log(gamma_h) * |query position - key|, the queries at
    the end of the keys."""
    out = torch.empty(len(gammas), q_len, kv_len, dtype=torch.float64)
    for h, g in enumerate(gammas):
        for i in range(q_len):
            for j in range(kv_len):
                out[h, i, j] = math.log(g) * abs(i + kv_len - q_len - j)
    return out
