"""Block tables: they encode exactly the dense mask, stay small, and tile grids so a tile's keys are compact."""

import pytest
import torch

from edgeattn import tables
from edgeattn.masks import causal, custom, materialize, neighborhood, sliding_window, window

from reference.mods import SHAPED, dist_bias, head_bias


def check_against_materialize(t, mask, heads, **shape):
    ref = materialize(mask, heads=heads, **shape)
    dense = t.to_dense()
    assert torch.equal(dense.mask.expand(ref.shape), ref)
    # structure: every tile lists each allowed key once, padding keys are never allowed
    T, tq = t.q_index.shape
    assert t.kv_index.shape[0] == T and t.block.shape == (T,) and t.bank.shape[2:] == (tq, t.kv_index.shape[1])
    assert torch.equal(t.q_index.flatten()[t.q_pos], torch.arange(t.shape.q_len))
    return dense


@pytest.mark.parametrize("mask,shape", SHAPED, ids=[m.name for m, _ in SHAPED])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("chunk_tiles", [None, 1, 2])
def test_blocked_matches_materialize(mask, shape, heads, chunk_tiles, monkeypatch):
    if chunk_tiles is not None:  # force many tile chunks to exercise the per-chunk key padding
        s = tables.Shape.of(**shape)
        monkeypatch.setattr(tables, "ROW_CHUNK_ELEMS", chunk_tiles * s.kv_len * 3)
    t = tables.build(mask, heads=heads, layout="blocked", tile=3, **shape)
    assert isinstance(t, tables.BlockTable) and t.layout == "blocked" and t.name == mask.name
    dense = check_against_materialize(t, mask, heads, **shape)
    assert t.fully_masked_rows == tables.build(mask, heads=heads, **shape).fully_masked_rows
    assert t.density == pytest.approx(float(dense.mask.expand(heads, -1, -1).float().mean()))


@pytest.mark.parametrize("combine", ["and", "or"])
def test_blocked_bias_matches_dense(combine):
    a, b = custom(lambda b_, h, q, kv: (q - kv).abs() <= 3, bias_mod=dist_bias), custom(bias_mod=head_bias)
    m = a & b if combine == "and" else a | b
    t = tables.build(m, q_len=20, heads=3, layout="blocked", tile=4)
    dense, want = t.to_dense(), tables.build(m, q_len=20, heads=3)
    assert torch.equal(dense.mask.expand(3, -1, -1), want.mask.expand(3, -1, -1))
    allowed = want.mask.expand(3, -1, -1)
    assert torch.equal(dense.bias.expand(3, -1, -1)[allowed], want.bias.expand(3, -1, -1)[allowed])
    assert t.bank_bias is not None and t.tensors()[-1] is t.bank_bias


def test_neighborhood_56x56_is_compact():
    t = tables.build(neighborhood(7), grid=(56, 56), layout="blocked")
    dense_fp32 = 3136 * 3136 * 4
    assert t.nbytes <= 0.01 * dense_fp32
    assert t.tile == (7, 7) and t.kv_index.shape == (64, 169)  # 13x13 key region per 7x7 query tile
    assert len(t.bank) == 9  # 3 positions per axis: border, inner, border
    assert t.work_fraction == pytest.approx(64 * 49 * 169 / 3136**2)
    check_against_materialize(t, neighborhood(7), 1, grid=(56, 56))


def test_tiling_hints_keep_dilation_groups_and_shifted_windows_compact():
    dilated = tables.build(neighborhood(7, dilation=2), grid=(56, 56), layout="blocked")
    assert dilated.kv_index.shape[1] == 169  # tiles stay inside one dilation group
    shifted = tables.build(window(7, 3), grid=(56, 56), layout="blocked")
    assert shifted.kv_index.shape[1] == 49  # one tile per shifted window
    assert bool(tables.build(window(7), grid=(56, 56), layout="blocked").full.all())
    assert not bool(shifted.full.all()) and bool(shifted.full.any())  # the last row/column's regions split


def test_3d_grid_builds_by_broadcasting():
    t = tables.build(neighborhood((3, 7, 7)), grid=(16, 32, 32), layout="blocked")
    assert t.tile == (1, 7, 7) and t.q_index.shape == (16 * 25, 49) and t.kv_index.shape[1] == 3 * 13 * 13
    assert t.nbytes <= 0.01 * (16 * 32 * 32) ** 2 * 4
    rows = t.bank[t.block].sum(-1)  # every query sees 3*7*7 keys
    assert bool((rows == 147).all())


def test_auto_layout_and_tile_override():
    assert tables.build(sliding_window(16), q_len=512, layout="auto").layout == "blocked"
    assert tables.build(sliding_window(400), q_len=512, layout="auto").layout == "dense"
    t = tables.build(neighborhood(7), grid=(56, 56), layout="blocked", tile=(4, 8))
    assert t.tile == (4, 8) and t.kv_index.shape[1] == 10 * 14
    with pytest.raises(ValueError, match="tile"):
        tables.build(neighborhood(7), grid=(56, 56), layout="blocked", tile=(4, 8, 2))


def test_a_mask_that_allows_nothing_still_builds():  # found by the fuzz tests: empty blocks broke the dedupe
    t = tables.build(custom(lambda b, h, q, kv: q < 0), q_len=6, layout="blocked", tile=4)
    assert t.kv_index.shape == (2, 1) and t.fully_masked_rows == 6 and not t.to_dense().mask.any()


def _document(n, lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert len(doc) == n
    return custom(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q), name="document")


LM_MASKS = [
    causal(),
    causal() | custom(lambda b, h, q, kv: kv < 300, name="prefix300"),
    _document(1024, [100, 400, 60, 300, 164]),
    custom(lambda b, h, q, kv: kv <= q, bias_mod=dist_bias),
]


@pytest.mark.parametrize("mask", LM_MASKS, ids=["causal", "prefix-lm", "document", "causal-bias"])
def test_bucketed_tables_encode_the_mask_at_less_work(mask):
    t = tables.build(mask, q_len=1024, layout="auto")
    plain = tables.build(mask, q_len=1024, layout="blocked")
    assert isinstance(t, tables.BucketedTable) and t.layout == "bucketed" and 1 < len(t.buckets) <= tables.MAX_BUCKETS
    if plain.work_fraction > tables.AUTO_BLOCKED_MAX_WORK:  # instead of a dense table
        assert t.work_fraction <= tables.AUTO_BUCKETED_MAX_WORK
    else:  # instead of a plain block table (documents)
        assert t.work_fraction <= tables.AUTO_BUCKETED_GAIN * plain.work_fraction
    dense, ref = t.to_dense(), tables.build(mask, q_len=1024)
    assert torch.equal(dense.mask, ref.mask)
    if ref.bias is not None:
        torch.testing.assert_close(dense.bias, torch.where(ref.mask, ref.bias, 0.0))
    # the buckets' rows, concatenated, hold every query; q_pos finds each
    rows = torch.cat([b.rows if isinstance(b, tables.DenseBucket) else b.q_index.flatten() for b in t.buckets])
    assert torch.equal(rows[t.q_pos], torch.arange(1024))
    for b in t.buckets:
        if isinstance(b, tables.DenseBucket):  # queries sharing one key list: a dense table over those keys
            assert b.table.mask.shape[1:] == (len(b.rows), len(b.keys)) and b.table.mask[..., -1].any()
        else:  # a block table of its own tiles, padded to its longest tile only
            assert torch.equal(b.q_pos, torch.arange(b.q_index.numel()))
            assert b.bank[b.block].flatten(1, 2).any(1)[:, -1].any()
    if "document" not in mask.name:  # every bucket's tiles attend a key prefix
        assert all(isinstance(b, tables.DenseBucket) for b in t.buckets)
    else:  # tiles of several documents: their own keys each
        assert any(isinstance(b, tables.BlockTable) for b in t.buckets)


def test_partition_minimizes_the_padded_work():
    assert tables._partition(torch.tensor([1, 1, 1, 10, 10, 10]), 2) == [(0, 3), (3, 6)]
    assert tables._partition(torch.tensor([1, 2, 3]), 8) == [(0, 1), (1, 2), (2, 3)]
    assert tables._partition(torch.tensor([5, 5, 5, 5]), 3) == [(0, 4)]
    counts = torch.arange(1, 33)
    parts = tables._partition(counts, 4)
    brute = min(
        sum((j - i) * int(counts[j - 1]) for i, j in zip((0, a, b), (a, b, c))) + (32 - c) * 32
        for a in range(1, 32)
        for b in range(a, 32)
        for c in range(b, 32)
    )
    assert sum((j - i) * int(counts[j - 1]) for i, j in parts) == brute


def test_auto_buckets_only_large_tables_without_a_learned_bias():
    assert isinstance(tables.build(causal(), q_len=1024, layout="auto", buckets=False), tables.DenseTable)
    assert isinstance(tables.build(causal(), q_len=512, layout="auto"), tables.DenseTable)  # under MIN_PAIRS
    assert isinstance(tables.build(causal(), q_len=1024, layout="blocked"), tables.BlockTable)


def test_bucketed_tables_keep_per_head_masks():
    mask = custom(lambda b, h, q, kv: (kv <= q) | ((h == 1) & (kv < 100)), name="head_prefix")
    t = tables.build(mask, q_len=1024, heads=2, layout="auto")
    assert isinstance(t, tables.BucketedTable)
    assert torch.equal(t.to_dense().mask, tables.build(mask, q_len=1024, heads=2).mask)


@pytest.mark.parametrize(
    "mask,shape",
    [
        (sliding_window(40, causal=False), dict(q_len=700)),
        (
            custom(lambda b, h, q, kv: (kv <= q) & (q - kv < 90), bias_mod=dist_bias, name="sliding_bias"),
            dict(q_len=700),
        ),
        (neighborhood(5, dilation=2), dict(grid=(30, 26))),
    ],
    ids=["sliding", "sliding-bias", "na2d"],
)
def test_chunked_tables_score_the_same_pairs_a_few_tiles_at_a_time(mask, shape):
    plain = tables.build(mask, layout="blocked", **shape)
    t = tables.chunked(plain, 3)
    count = plain.q_index.shape[0]
    assert [b.q_index.shape[0] for b in t.buckets] == [3] * (count // 3) + ([count % 3] if count % 3 else [])
    assert t.work_fraction == pytest.approx(plain.work_fraction)
    dense, ref = t.to_dense(), tables.build(mask, **shape)
    assert torch.equal(dense.mask, ref.mask)
    if ref.bias is not None:
        torch.testing.assert_close(dense.bias, torch.where(ref.mask, ref.bias, 0.0))


def test_auto_chunks_only_block_tables_whose_scores_outgrow_the_cache(monkeypatch):
    assert isinstance(tables.build(sliding_window(256), q_len=4096, layout="auto"), tables.BlockTable)  # 5 MB
    monkeypatch.setattr(tables, "AUTO_CHUNK_BYTES", 2**20)  # 4 MB of scores at 4k tokens: now chunked
    t = tables.build(sliding_window(256), q_len=4096, layout="auto")
    assert isinstance(t, tables.BucketedTable) and len(t.buckets) == 4  # 64 tiles, 1.5 MB / 80 kB = 19 per chunk
    assert isinstance(tables.build(neighborhood(7, rpb=True), grid=(64, 64), layout="auto"), tables.BlockTable)
