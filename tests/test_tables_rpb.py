"""Learned relative position bias (rpb): the index each (query, key) pair gets, against brute-force loops written
from the references, in both table layouts, and the errors for masks where the references define no bias.

NATTEN (github.com/SHI-Labs/NATTEN v0.17.5, csrc/include/natten/cpu/naive/natten_cpu_commons.h and
pointwise_neighborhood_*d.hpp): for query i the kernel visits keys ``start + ki * d`` (``get_window_start``) and adds
``rpb[h, pb_start + ki]`` (``get_pb_start``), per axis.  Swin (github.com/microsoft/Swin-Transformer,
models/swin_transformer.py): the map is rolled by -shift and cut into windows; inside a window, query a and key b
get ``relative_position_index[a, b] = (ya - yb + Wh - 1)(2Ww - 1) + (xa - xb + Ww - 1)``.
"""

import dataclasses

import pytest
import torch

from edgeattn import tables
from edgeattn.masks import Mask, and_masks, causal, custom, neighborhood, or_masks, window
from edgeattn.masks.base import rpb_index

from reference.rpb import natten_index_loop, swin_index_loop

# ----------------------------------------------------------------------------- NATTEN (reference/rpb.py)
NA_CASES = [
    ((9,), (3,), (1,)),
    ((11,), (5,), (2,)),
    ((10,), (3,), (3,)),
    ((7, 7), (7, 7), (1, 1)),
    ((14, 13), (3, 5), (2, 1)),
    ((12, 12), (5, 5), (2, 2)),
    ((56, 56), (7, 7), (8, 8)),
    ((5, 10, 6), (3, 5, 3), (1, 2, 1)),
    ((6, 6, 7), (3, 3, 3), (2, 1, 2)),
]


@pytest.mark.parametrize("grid, kernel, dilation", NA_CASES)
def test_neighborhood_rpb_index_matches_natten_loop(grid, kernel, dilation):
    mask = neighborhood(kernel, dilation=dilation, rpb=True)
    want = natten_index_loop(grid, kernel, dilation)
    assert torch.equal(rpb_index(mask, grid=grid), want)
    check_tables(mask, grid, want, tuple(2 * k - 1 for k in kernel))


# ----------------------------------------------------------------------------- Swin (reference/rpb.py)
SWIN_CASES = [
    ((14, 14), (7, 7), (0, 0)),
    ((14, 14), (7, 7), (3, 3)),
    ((8, 12), (4, 3), (2, 1)),
    ((7, 7), (7, 7), (0, 0)),
    ((56, 56), (7, 7), (3, 3)),
]


@pytest.mark.parametrize("grid, size, shift", SWIN_CASES)
def test_window_rpb_index_matches_swin(grid, size, shift):
    mask = window(size, shift=shift, rpb=True)
    want = swin_index_loop(grid, size, shift)
    assert torch.equal(rpb_index(mask, grid=grid), want)
    check_tables(mask, grid, want, ((2 * size[0] - 1) * (2 * size[1] - 1),))


def check_tables(mask, grid, want, rpb_shape):
    """Both layouts store the wanted index where the pair is allowed and 0 elsewhere; the block table keeps the
    deduplicated bank and to_dense() gives the dense table back."""
    dense = tables.build(mask, grid=grid)
    assert dense.rpb_shape == rpb_shape and dense.bias_index.dtype == torch.int32
    assert dense.bias_index.shape == (1,) + want.shape and dense.bias is None
    assert torch.equal(dense.mask[0], want >= 0)
    assert torch.equal(dense.bias_index[0].long(), want.clamp(min=0))
    assert dense.nbytes == dense.mask.numel() + 4 * dense.bias_index.numel()
    blocked = tables.build(mask, grid=grid, layout="blocked")
    assert blocked.rpb_shape == rpb_shape and blocked.bank_bias_index.dtype == torch.int32
    assert blocked.bank_bias_index.shape == (len(blocked.bank), 1) + blocked.bank.shape[2:]
    back = blocked.to_dense()
    assert torch.equal(back.mask, dense.mask) and torch.equal(back.bias_index, dense.bias_index)
    assert not blocked.bank_bias_index[~blocked.bank.expand_as(blocked.bank_bias_index)].any()  # padding is 0
    assert (
        blocked.nbytes
        == sum(t.numel() * t.element_size() for t in blocked.tensors()) + 4 * blocked.bank_bias_index.numel()
    )


def test_rpb_bank_dedupes_like_the_mask_bank():
    # interior tiles see the same offsets: the rpb index adds no bank entries (NAT 56x56 k7: 9 border cases)
    plain = tables.build(neighborhood(7), grid=(56, 56), layout="blocked")
    learned = tables.build(neighborhood(7, rpb=True), grid=(56, 56), layout="blocked")
    assert len(learned.bank) == len(plain.bank) == 9 and torch.equal(learned.kv_index, plain.kv_index)
    assert learned.nbytes == plain.nbytes + 9 * 49 * 169 * 4
    assert len(tables.build(window(7, 3, rpb=True), grid=(56, 56), layout="blocked").bank) == 4


def test_names_record_rpb_and_plain_masks_are_unchanged():
    assert neighborhood(7, dilation=2, rpb=True).name == "neighborhood_k7_d2_rpb"
    assert window(7, 3, rpb=True).name == "window_7_shift3_rpb"
    assert neighborhood(7).rpb is None and window(7).rpb is None
    t = tables.build(neighborhood(3), grid=(6, 6))
    assert t.bias_index is None and t.rpb_shape == ()


def test_and_masks_keep_the_rpb_index():
    both = and_masks(neighborhood(5, rpb=True), custom(lambda b, h, q, kv: kv % 2 == 0))
    want = natten_index_loop((9, 9), (5, 5), (1, 1))
    want[:, 1::2] = -1
    assert torch.equal(rpb_index(both, grid=(9, 9)), want)
    assert torch.equal(
        tables.build(both, grid=(9, 9), layout="blocked").to_dense().bias_index[0].long(), want.clamp(min=0)
    )


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: neighborhood(4, rpb=True), "odd kernels"),
        (lambda: neighborhood(5, stride=2, rpb=True), "stride 1"),
        (lambda: neighborhood(5, causal=True, rpb=True), "causal"),
        (lambda: neighborhood(5, rpb=1), "rpb must be True or False"),
        (lambda: window(4, rpb="yes"), "rpb must be True or False"),
        (lambda: or_masks(neighborhood(3, rpb=True), causal()), "at most one mask with rpb"),
        (lambda: and_masks(neighborhood(3, rpb=True), window(4, rpb=True)), "at most one mask with rpb"),
    ],
)
def test_bad_rpb_masks_are_clear_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def _custom_rpb(index_mod, entries=4):
    return Mask(
        "toy_rpb",
        lambda shape: (lambda b, h, q, kv: (q - kv).abs() <= 1, None),
        rpb=lambda shape: ((entries,), index_mod),
    )


@pytest.mark.parametrize("layout", ["dense", "blocked"])
@pytest.mark.parametrize(
    "index_mod, match",
    [
        (lambda b, h, q, kv: q - kv + 1, "outside its table of 2 entries"),  # offsets -1..1 need 3 entries
        (lambda b, h, q, kv: (q - kv + 1) + 3 * h, "must not depend on the head"),
        (lambda b, h, q, kv: (q - kv).float(), "integer tensor"),
    ],
)
def test_bad_index_mods_are_clear_errors(index_mod, match, layout):
    mask = _custom_rpb(index_mod, entries=2 if "outside" in match else 6)
    with pytest.raises(ValueError, match=match):
        tables.build(mask, q_len=6, heads=2, layout=layout, tile=2)


def test_a_custom_rpb_mask_builds_in_both_layouts():
    mask = _custom_rpb(lambda b, h, q, kv: q - kv + 1, entries=3)
    dense, blocked = tables.build(mask, q_len=7), tables.build(mask, q_len=7, layout="blocked", tile=2)
    want = torch.where(
        (torch.arange(7)[:, None] - torch.arange(7)).abs() <= 1, torch.arange(7)[:, None] - torch.arange(7) + 1, 0
    )
    assert torch.equal(dense.bias_index[0].long(), want)
    assert torch.equal(blocked.to_dense().bias_index, dense.bias_index)


def test_reuse_builds_a_shared_mask_once():
    calls = []

    def counted(mask):  # the same Mask (name, tiling, rpb), noting each table built from it (one mods() call each)
        return dataclasses.replace(mask, mods=lambda shape: calls.append(1) or mask.mods(shape))

    mask = counted(neighborhood(3, rpb=True))
    with tables.reuse():
        first = tables.build(mask, grid=(9, 9), layout="auto")
        assert tables.build(mask, grid=(9, 9), layout="auto") is first
        other = counted(neighborhood(3, rpb=True))  # an equal mask, another object
        assert tables.build(other, grid=(9, 9), layout="auto") is not first
    assert tables.build(mask, grid=(9, 9), layout="auto") is not first  # the memo ends with the block
    assert len(calls) == 3
