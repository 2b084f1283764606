"""Polyline path masks (PPMA) against naive sums over the path, written from the definition with plain loops
(reference/polyline.py)."""

import pytest
import torch

from edgeattn.masks.polyline import line_biases, path_sums, polyline_bias

from reference.polyline import naive_1d, naive_2d, segment


def _decays(*shape, seed=0):
    """Random PPMA-like decays (nonpositive) and, to show the rule does not rely on the sign, mixed-sign ones."""
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)


def test_segment_helper_is_the_half_open_interval():
    values = [1.0, 10.0, 100.0, 1000.0]
    assert segment(values, 0, 2) == 110.0 and segment(values, 2, 0) == 110.0  # (0, 2] = 1, 2
    assert segment(values, 3, 3) == 0.0 and segment(values, 0, 3) == 1110.0


@pytest.mark.parametrize("length", [1, 2, 7])
def test_1d_mask_matches_the_path_sum(length):
    for decay in _decays(3, length):
        fast = path_sums(decay[None])[0]
        naive = torch.tensor([naive_1d(row.tolist()) for row in decay], dtype=torch.float64)
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


def test_1d_mask_of_nonpositive_decays_is_minus_abs_cumsum_difference():
    decay = _decays(2, 3, 9)[0]
    c = decay.cumsum(-1)
    torch.testing.assert_close(path_sums(decay), -(c[..., :, None] - c[..., None, :]).abs(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(3, 4), (4, 3), (1, 5), (2, 2)])
@pytest.mark.parametrize("first", ["row", "column"])
def test_2d_mask_matches_the_polyline_path_sum(grid, first):
    for seed in range(2):
        for row_decay, col_decay in zip(*(_decays(2, 3, *grid, seed=seed + 10 * k) for k in range(2))):
            fast = polyline_bias(row_decay, col_decay, first)  # (2 batch, 3 heads, N, N)
            assert fast.shape == (2, 3, grid[0] * grid[1], grid[0] * grid[1])
            for b in range(2):
                for h in range(3):
                    naive = naive_2d(row_decay[b, h].tolist(), col_decay[b, h].tolist(), first)
                    torch.testing.assert_close(fast[b, h], torch.tensor(naive, dtype=torch.float64), rtol=0, atol=1e-12)


def test_orientations_are_transposes_and_the_row_mask_is_not_symmetric():
    row_decay, col_decay = _decays(1, 2, 4, 5)[0], _decays(1, 2, 4, 5, seed=1)[0]
    by_row, by_column = polyline_bias(row_decay, col_decay, "row"), polyline_bias(row_decay, col_decay, "column")
    assert torch.equal(by_column, by_row.transpose(-1, -2))
    assert not torch.allclose(by_row, by_column)


def test_line_biases_are_the_1d_masks_of_each_row_and_column():
    row_decay, col_decay = _decays(2, 3, 4)[0], _decays(2, 3, 4, seed=1)[0]
    rows, cols = line_biases(row_decay, col_decay)
    assert rows.shape == (2, 3, 4, 4) and cols.shape == (2, 4, 3, 3)
    for b in range(2):
        for r in range(3):
            torch.testing.assert_close(
                rows[b, r], torch.tensor(naive_1d(row_decay[b, r].tolist()), dtype=torch.float64), rtol=0, atol=1e-12
            )
        for c in range(4):
            torch.testing.assert_close(
                cols[b, c], torch.tensor(naive_1d(col_decay[b, :, c].tolist()), dtype=torch.float64), rtol=0, atol=1e-12
            )


def test_float32_nonpositive_decays_give_exact_symmetric_line_masks():
    # PPMA's own construction subtracts the larger cumsum from the smaller on each side of the diagonal: ours
    # gives the same floats, so the 1-D masks are exactly symmetric
    decay = -torch.rand(4, 56, generator=torch.Generator().manual_seed(0)) * 0.1
    m = path_sums(decay)
    assert torch.equal(m, m.transpose(-1, -2)) and (m <= 0).all()


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="first must be one of"):
        polyline_bias(torch.zeros(2, 2), torch.zeros(2, 2), first="diagonal")
    with pytest.raises(ValueError, match="same shape"):
        polyline_bias(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="floating-point tensor"):
        path_sums(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dimension"):
        line_biases(torch.zeros(3), torch.zeros(3))
