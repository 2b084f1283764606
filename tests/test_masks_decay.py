"""Retention decay masks (RMT): tables against brute-force loops, in both layouts; names; bad parameters."""

import math

import pytest
import torch

from edgeattn import tables
from edgeattn.masks import decay_1d, manhattan_decay, materialize

from reference.decay import brute_1d, brute_manhattan


def check_layouts(mask, want, **shape):
    """Dense and blocked tables both allow every key and carry exactly ``want`` as the bias."""
    heads = want.shape[0]
    for layout in ("dense", "blocked"):
        table = tables.build(mask, heads=heads, layout=layout, **shape)
        dense = table if layout == "dense" else table.to_dense()
        assert dense.mask.all() and dense.fully_masked_rows == 0
        assert torch.allclose(dense.bias.double().expand_as(want), want, rtol=1e-6, atol=1e-6), layout
    assert materialize(mask, heads=heads, **shape).all()


@pytest.mark.parametrize("grid", [(6,), (4, 5), (3, 1, 4)])
def test_manhattan_decay_matches_brute_force(grid):
    gammas = [0.5, 0.9, 0.99]
    check_layouts(manhattan_decay(gammas), brute_manhattan(grid, gammas), grid=grid)


def test_one_gamma_is_shared_by_every_head():
    table = tables.build(manhattan_decay(0.8), grid=(3, 3), heads=4)
    assert table.bias.shape == (1, 9, 9)  # stored once, broadcast over heads
    assert torch.allclose(table.bias.double(), brute_manhattan((3, 3), [0.8]), atol=1e-6)


@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (3, 9), (1, 4)])
def test_decay_1d_matches_brute_force(q_len, kv_len):
    gammas = [0.75, 0.96875]
    check_layouts(decay_1d(gammas), brute_1d(q_len, kv_len, gammas), q_len=q_len, kv_len=kv_len)


def test_float32_product_like_the_reference():
    # bias = float32(distance) * float32(log gamma): exp() of a float32 log-decay reproduces it bit for bit
    log_gammas = torch.log(1 - 2.0 ** -torch.tensor([2.0, 3.5, 5.0]))
    table = tables.build(decay_1d([math.exp(v) for v in log_gammas.tolist()]), q_len=40, heads=3)
    distance = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs().float()
    assert torch.equal(table.bias, distance * log_gammas[:, None, None])


def test_names_encode_the_gammas():
    assert manhattan_decay([0.75, 0.875]).name == "manhattan_decay_g0.75_0.875"
    assert decay_1d(0.5).name == "decay_1d_g0.5"
    assert manhattan_decay([0.75, 0.875]).name != manhattan_decay([0.75, 0.876]).name


@pytest.mark.parametrize("gammas", [0.0, 1.5, -0.2, [], [0.5, True], "0.5", [0.5, float("nan")], None])
def test_bad_gammas_are_rejected(gammas):
    with pytest.raises(ValueError, match="gamma"):
        manhattan_decay(gammas)
    with pytest.raises(ValueError, match="gamma"):
        decay_1d(gammas)


def test_gamma_count_must_match_heads():
    with pytest.raises(ValueError, match="2 gammas .* 3 heads"):
        tables.build(manhattan_decay([0.5, 0.9]), grid=(3, 3), heads=3)
    with pytest.raises(ValueError, match="2 gammas .* 1 heads"):
        tables.build(decay_1d([0.5, 0.9]), q_len=4, heads=1)


def test_manhattan_decay_needs_a_grid():
    with pytest.raises(ValueError, match="manhattan_decay needs a 1-D/2-D/3-D token grid"):
        tables.build(manhattan_decay(0.9), q_len=10)
