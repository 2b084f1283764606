"""Mask families against independent brute-force references written from the spec (plain Python, no torch; in
reference/masks.py)."""

import math

import pytest
import torch

from edgeattn import tables
from edgeattn.layers import MaskedSelfAttention
from edgeattn.masks import FAMILIES, causal, custom, materialize, neighborhood, segments, sinks, sliding_window, window

from reference.masks import axis_tuple, ref_neighborhood, ref_seq, ref_window, swin_literal


def check(mask, ref, heads=1, **shape):
    got = materialize(mask, heads=heads, **shape)
    want = torch.tensor(ref, dtype=torch.bool)
    assert got.dtype == torch.bool and got.shape == (heads,) + tuple(want.shape)
    assert torch.equal(got, want.expand_as(got)), f"{mask.name}: {(got != want).nonzero()[:8].tolist()}"
    t = tables.build(mask, heads=heads, **shape)
    assert t.mask.dtype == torch.bool and t.mask.shape[0] in (1, heads) and t.bias is None
    assert torch.equal(t.mask.broadcast_to(got.shape), got)
    return got[0]


# ----------------------------------------------------------------------------- neighborhood
def rows(L, k, d=1, s=1, c=False):
    m = check(neighborhood(k, d, s, c), ref_neighborhood((L,), k, d, s, c), grid=(L,))
    return {q: set(m[q].nonzero().flatten().tolist()) for q in range(L)}


R = lambda a, b: set(range(a, b + 1))  # noqa: E731
WORKED = [
    ((7, 3), [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {4, 5, 6}]),
    ((8, 4), [R(0, 3)] * 3 + [R(1, 4), R(2, 5), R(3, 6), R(4, 7), R(4, 7)]),
    ((9, 3, 2), [{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {3, 5, 7}, {4, 6, 8}, {3, 5, 7}, {4, 6, 8}]),
    ((6, 3, 1, 1, True), [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}]),
    ((8, 4, 1, 2), [R(0, 3)] * 2 + [R(1, 4)] * 2 + [R(3, 6)] * 2 + [R(4, 7)] * 2),
    ((8, 4, 1, 2, True), [{0}, {0, 1}, R(0, 2), R(0, 3), R(2, 4), R(2, 5), R(4, 6), R(4, 7)]),
]


@pytest.mark.parametrize("args,expected", WORKED, ids=[str(a) for a, _ in WORKED])
def test_neighborhood_worked_examples(args, expected):
    assert rows(*args) == dict(enumerate(expected))
    ref = ref_neighborhood((args[0],), *args[1:])  # the reference itself agrees with the spec's examples
    assert [{j for j, ok in enumerate(r) if ok} for r in ref] == expected


NA_1D = [
    (7, 3, 1, 1, False),
    (10, 3, 3, 1, False),
    (11, 4, 2, 1, False),
    (11, 4, 2, 3, True),
    (13, 5, 2, 2, False),
    (9, 5, 1, 5, False),
    (10, 4, 1, 3, False),
    (10, 4, 1, 3, True),
    (7, 7, 1, 1, False),
    (7, 7, 1, 7, True),
    (12, 2, 1, 1, False),
    (12, 2, 3, 2, True),
    (14, 3, 4, 2, False),
    (14, 3, 4, 3, True),
    (5, 2, 2, 1, False),
]
NA_ND = [
    ((6, 7), 3, 1, 1, False),
    ((6, 7), (3, 4), 1, 1, False),
    ((8, 6), (3, 2), (2, 1), (1, 2), (True, False)),
    ((9, 10), (4, 3), (2, 3), (2, 3), (False, True)),
    ((5, 5), 5, 1, 1, False),
    ((7, 8), 3, 1, 1, True),
    ((7, 5), (5, 2), (1, 2), (4, 1), False),
    ((4, 5, 6), (3, 2, 4), 1, 1, False),
    ((4, 6, 5), 3, (1, 2, 1), (1, 2, 3), (True, False, True)),
    ((5, 4, 6), (2, 2, 3), (2, 1, 2), 1, False),
    ((3, 4, 5), 3, 1, (1, 2, 3), True),
]


@pytest.mark.parametrize("grid,k,d,s,c", [((L,), k, d, s, c) for L, k, d, s, c in NA_1D] + NA_ND)
def test_neighborhood_matches_reference(grid, k, d, s, c):
    m = check(neighborhood(k, d, s, c), ref_neighborhood(grid, k, d, s, c), grid=grid, heads=1 + len(grid) % 2)
    if len(grid) == 1:  # a 1-D grid may be given as a bare int
        check(neighborhood(k, d, s, c), ref_neighborhood(grid, k, d, s, c), grid=grid[0])
    if not any(axis_tuple(c, len(grid))):  # non-causal: every query sees exactly prod(kernel) keys
        assert (m.sum(-1) == math.prod(axis_tuple(k, len(grid)))).all()


# ----------------------------------------------------------------------------- Swin windows
SWIN = [
    ((8, 8), 4, 0),
    ((8, 8), 4, 2),
    ((8, 8), 4, 1),
    ((8, 8), 4, 3),
    ((12, 8), (4, 2), (2, 1)),
    ((6, 9), 3, 1),
    ((12, 12), (3, 4), (1, 2)),
    ((8, 6), (4, 3), (2, 0)),
    ((8, 8), 2, 1),
    ((4, 4), 4, 2),
    ((6, 4), (2, 4), 0),
]


@pytest.mark.parametrize("grid,size,shift", SWIN)
def test_window_matches_references(grid, size, shift):
    m = check(window(size, shift), ref_window(grid, size, shift), grid=grid)
    assert torch.equal(m, swin_literal(grid, size, shift))
    if not any(axis_tuple(shift, 2)):
        assert (m.sum(-1) == math.prod(axis_tuple(size, 2))).all()


# ----------------------------------------------------------------------------- sequence masks
QKV = [(8, 8), (3, 8), (1, 5), (5, 6)]


@pytest.mark.parametrize("q_len,kv_len", QKV)
def test_causal(q_len, kv_len):
    check(causal(), ref_seq(lambda q, k: k <= q, q_len, kv_len), q_len=q_len, kv_len=kv_len)


@pytest.mark.parametrize("q_len,kv_len", QKV)
@pytest.mark.parametrize("w", [1, 2, 5, 20])
@pytest.mark.parametrize("is_causal", [True, False])
def test_sliding_window(q_len, kv_len, w, is_causal):
    pred = (lambda q, k: 0 <= q - k <= w) if is_causal else (lambda q, k: abs(q - k) <= w)
    check(sliding_window(w, causal=is_causal), ref_seq(pred, q_len, kv_len), q_len=q_len, kv_len=kv_len)


def test_query_alignment_literal():
    # 2 queries at the end of 5 keys sit at positions 3 and 4
    assert materialize(causal(), q_len=2, kv_len=5)[0].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert materialize(sliding_window(1), q_len=2, kv_len=5)[0].tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("q_len,kv_len", [(8, 8), (4, 10), (1, 7)])
@pytest.mark.parametrize("n,w", [(0, 2), (2, 1), (3, 0), (1, 10), (12, 0)])
def test_sinks(q_len, kv_len, n, w):
    check(
        sinks(n, w), ref_seq(lambda q, k: k <= q and (k < n or q - k <= w), q_len, kv_len), q_len=q_len, kv_len=kv_len
    )


@pytest.mark.parametrize(
    "ids,q_len",
    [
        ([0, 0, 1, 1, 1, 2], None),
        ([0] * 5, None),
        ([0, 1, 2, 3], None),
        ([3, 3, 5, 5, 5, 9, 9], None),
        ([0, 0, 1, 1, 1, 2, 2], 3),
        ([0, 0, 0, 1, 1], 1),
        (torch.tensor([1, 1, 2, 2, 2, 2]), 4),
    ],
)
def test_segments(ids, q_len):
    seg = [int(x) for x in ids]
    kv_len = len(seg)
    q_len = q_len or kv_len
    pred = lambda q, k: seg[k] == seg[q] or (seg[k] < seg[q] and k <= q)  # noqa: E731
    check(segments(ids), ref_seq(pred, q_len, kv_len), q_len=q_len, kv_len=kv_len)


@pytest.mark.parametrize("q_len", [6, 9])
def test_segments_more_queries_than_keys(q_len):
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        materialize(segments([0, 0, 1, 1]), q_len=q_len, kv_len=4)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: neighborhood(torch.tensor(3.5)),
        lambda: window(torch.tensor(2.5)),
        lambda: sliding_window(torch.tensor(2.7)),
    ],
)
def test_float_tensor_sizes_rejected(factory):
    with pytest.raises(ValueError):
        factory()


def test_families_registry():
    # other families register next to these; the core ones must stay
    assert set(FAMILIES) >= {"causal", "sliding_window", "sinks", "segments", "neighborhood", "window"}
    assert all(callable(f) and isinstance(doc, str) for f, doc in FAMILIES.values())


# ----------------------------------------------------------------------------- bad parameters
def _shape_err(mask, match, **shape):
    with pytest.raises(ValueError, match=match):
        materialize(mask, **shape)
    with pytest.raises(ValueError, match=match):
        tables.build(mask, **shape)


# masks and shapes they cannot be built for, and a word of the error (test_error_family.py runs them too)
BAD_SHAPES = [
    (lambda: neighborhood(7), dict(grid=(5, 5)), "kernel"),
    (lambda: neighborhood((3, 7)), dict(grid=(8, 6)), "kernel"),
    (lambda: neighborhood(3, dilation=3), dict(grid=(8,)), "dilation"),
    (lambda: neighborhood(3), dict(q_len=16), "grid"),
    (lambda: neighborhood((3, 3)), dict(grid=(8,)), "grid"),
    (lambda: neighborhood(3), dict(grid=(3, 3, 3, 3)), "grid"),
    (lambda: window(3), dict(grid=(8, 9)), "size"),
    (lambda: window((4, 3), 1), dict(grid=(8, 8)), "size"),
    (lambda: window(2), dict(grid=(8,)), "grid"),
    (lambda: segments([0, 0, 1]), dict(q_len=4), "segment_ids"),
    (lambda: segments([0, 0, 1, 1]), dict(q_len=2, kv_len=5), "segment_ids"),
]


@pytest.mark.parametrize("mask,shape,match", BAD_SHAPES)
def test_bad_shape_raises(mask, shape, match):
    _shape_err(mask(), match, **shape)


# mask factories refusing their parameters
BAD_PARAMETERS = [
    (lambda: neighborhood(1), "kernel"),
    (lambda: neighborhood(3.5), "kernel"),
    (lambda: neighborhood("3"), "kernel"),
    (lambda: neighborhood(True), "kernel"),
    (lambda: neighborhood(3, dilation=0), "dilation"),
    (lambda: neighborhood(3, dilation=1.5), "dilation"),
    (lambda: neighborhood(3, stride=4), "stride"),
    (lambda: neighborhood(3, stride=0), "stride"),
    (lambda: neighborhood((3, 3), stride=(1, 4)), "stride"),
    (lambda: neighborhood((3, 3), dilation=(1, 1, 1)), "dilation"),
    (lambda: neighborhood((3, 3), causal=(True,)), "causal"),
    (lambda: neighborhood(3, causal=1), "causal"),
    (lambda: window(2.0), "size"),
    (lambda: window(0), "size"),
    (lambda: window(4, 4), "shift"),
    (lambda: window(4, 5), "shift"),
    (lambda: window((4, 2), (1, 2)), "shift"),
    (lambda: window(4, -1), "shift"),
    (lambda: window((4, 4, 4)), "size"),
    (lambda: window(4, (1, 1, 1)), "shift"),
    (lambda: sliding_window(0), "window"),
    (lambda: sliding_window(2.5), "window"),
    (lambda: sliding_window(2, causal="yes"), "causal"),
    (lambda: sinks(-1, 2), "n_sink"),
    (lambda: sinks(1, -2), "window"),
    (lambda: segments([0, 1, 1, 0]), "segment_ids"),
    (lambda: segments([2, 1]), "segment_ids"),
    (lambda: segments([-1, 0]), "segment_ids"),
    (lambda: segments([]), "segment_ids"),
    (lambda: segments([0.0, 1.0]), "segment_ids"),
]


@pytest.mark.parametrize("factory,match", BAD_PARAMETERS)
def test_bad_parameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# shapes no table has (for causal)
BAD_TABLE_SHAPES = [
    (dict(q_len=0), "q_len"),
    (dict(q_len=4, kv_len=0), "kv_len"),
    (dict(grid=(4, 0)), "grid"),
    (dict(grid=(4, 4), q_len=8), "q_len"),
    (dict(), "q_len"),
]


@pytest.mark.parametrize("shape,match", BAD_TABLE_SHAPES)
def test_bad_shapes(shape, match):
    _shape_err(causal(), match, **shape)


def test_bare_mask_mod_on_the_left_of_a_mask():
    combined = (lambda b, h, q, kv: q % 2 == kv % 2) & causal()
    expected = torch.tensor([[q >= k and q % 2 == k % 2 for k in range(6)] for q in range(6)])
    assert torch.equal(materialize(combined, q_len=6)[0], expected)
    assert materialize((lambda b, h, q, kv: q == kv) | causal(), q_len=5)[0].sum() == 15


def test_document_mask_indexed_by_batch_is_refused_with_what_to_do():
    """FlexAttention's document masking: a static table would give every batch element batch 0's mask."""
    doc = torch.tensor([[0] * 4 + [1] * 4, [0] * 2 + [1] * 6])
    for layout in ("dense", "blocked", "auto"):
        with pytest.raises(
            ValueError,
            match=r"mask_mod of mask custom depends on the batch index b.*"
            r"edgeattn\.masked_attention\(q, k, v, mask\)",
        ):
            tables.build(lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx], q_len=8, layout=layout)


def causal_with_if(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return torch.tensor(True)
    return torch.tensor(False)


def causal_with_item(b, h, q_idx, kv_idx):
    return torch.tensor((q_idx - kv_idx).item() >= 0)


@pytest.mark.parametrize(
    "fn,cause",
    [
        (causal_with_if, "Boolean value of Tensor"),
        (causal_with_item, "a Tensor with 64 elements cannot be converted to Scalar"),
    ],
)
def test_mask_functions_written_per_pair_get_one_error_naming_the_mask_and_the_fix(fn, cause):
    for layout in ("dense", "blocked"):
        with pytest.raises(
            ValueError,
            match=rf"mask_mod of mask {fn.__name__} cannot be evaluated on index "
            rf"tensors \(RuntimeError: {cause}.*&, \|, ~ and torch.where",
        ):
            tables.build(fn, q_len=8, layout=layout)
    with pytest.raises(ValueError, match=rf"bias_mod of mask {fn.__name__} cannot be evaluated"):
        tables.build(custom(bias_mod=lambda b, h, q, kv: fn(b, h, q, kv).float(), name=fn.__name__), q_len=8)


def test_a_layer_without_its_token_count_names_its_own_parameters():
    with pytest.raises(ValueError, match="pass seq_len=N for a sequence or grid="):
        MaskedSelfAttention(64, 4, causal())


def test_a_mask_indexing_a_captured_tensor_out_of_range_says_so():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"mask_mod of mask custom indexes out of range \(index 4 is out of bounds"):
        tables.build(lambda b, h, q_idx, kv_idx: ids[q_idx] == ids[kv_idx], q_len=8, layout="blocked")


# --------------------------------------------------------------- a user's mask_mod means what it means in FlexAttention
def reads_across_pairs_with_if(b, h, q_idx, kv_idx):
    if (q_idx - kv_idx).max() > 0:  # on one pair: is this pair below the diagonal
        return q_idx >= kv_idx
    return q_idx == q_idx


@pytest.mark.parametrize(
    "fn,message",
    [
        (reads_across_pairs_with_if, "gives False for the pair (q_idx=0, kv_idx=8, head 0) on broadcast index"),
        (
            lambda b, h, q_idx, kv_idx: torch.isin(kv_idx, torch.nonzero(q_idx.flatten() % 2 == 0).flatten()),
            "gives True for the pair (q_idx=0, kv_idx=8, head 0) on broadcast index tensors but False called on",
        ),
        (
            lambda b, h, q_idx, kv_idx: q_idx[..., 0:1] >= kv_idx,
            "cannot be called on one pair (h=0, q_idx=0, kv_idx=0)",
        ),
    ],
)
def test_a_mask_mod_that_reads_across_pairs_is_refused_naming_a_pair(fn, message):
    """Three mask_mods whose broadcast call builds some mask while FlexAttention, one pair at a time, means another
    (or cannot run them): each refused in one line that names a pair."""
    with pytest.raises(ValueError) as info:
        materialize(custom(fn), q_len=12, kv_len=9)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_mask_mod_written_for_vmap_builds_what_flex_attention_builds():
    """attention-gym's Flamingo cross-attention mask indexes a captured table with kv_idx and reads the interval's
    ends: FlexAttention's create_mask runs it, and so does a table, with the same mask."""
    from torch.nn.attention.flex_attention import create_mask

    intervals = torch.tensor([[0, 7], [1, 7], [7, 12]])
    image_of_key = torch.repeat_interleave(torch.arange(3), 3)

    def flamingo(b, h, q_idx, kv_idx):
        interval = intervals[image_of_key[kv_idx]]
        return (q_idx >= interval[0]) & (q_idx < interval[1])

    want = create_mask(flamingo, 1, 1, 12, 9, device="cpu")[0, 0]
    assert torch.equal(materialize(custom(flamingo), q_len=12, kv_len=9)[0], want)
    for layout in ("dense", "blocked"):
        table = tables.build(custom(flamingo), q_len=12, kv_len=9, layout=layout)
        dense = table if isinstance(table, tables.DenseTable) else table.to_dense()
        assert torch.equal(dense.mask[0], want), layout


def test_a_mask_mod_with_the_wrong_arguments_is_told_which_four_it_needs():
    with pytest.raises(ValueError) as info:
        custom(lambda q, kv, h: q >= kv)
    assert str(info.value) == (
        "mask_mod takes 3 arguments (q, kv, h); a FlexAttention mask_mod takes four: (b, h, q_idx, kv_idx), the "
        "batch, head, query and key indices"
    )
