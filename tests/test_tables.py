"""Dense tables: agreement with materialize(), FlexAttention mask_mods, composition, biases, table properties."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from edgeattn import tables
from edgeattn.masks import (
    Mask,
    and_masks,
    causal,
    custom,
    materialize,
    neighborhood,
    or_masks,
    segments,
    sinks,
    sliding_window,
    window,
)

from reference.mods import SHAPED, causal_mod, dist_bias, doc_mod, head_bias, head_mod, loop_table

H, Q, KV = 4, 12, 12


@pytest.mark.parametrize("mask,shape", SHAPED, ids=[m.name for m, _ in SHAPED])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
def test_build_matches_materialize(mask, shape, heads, chunk_rows, monkeypatch):
    if chunk_rows is not None:  # force many row chunks to exercise the chunked evaluation
        kv_len = shape.get("kv_len") or tables.Shape.of(**shape).kv_len
        monkeypatch.setattr(tables, "ROW_CHUNK_ELEMS", chunk_rows * kv_len)
    t = tables.build(mask, heads=heads, **shape)
    ref = materialize(mask, heads=heads, **shape)
    assert isinstance(t, tables.DenseTable) and t.name == mask.name and t.layout == "dense"
    assert t.mask.dtype == torch.bool and t.mask.is_contiguous()
    assert t.mask.shape == ((heads if mask.name == "head_mod" and heads > 1 else 1),) + ref.shape[1:]
    assert torch.equal(t.mask.broadcast_to(ref.shape), ref)


# ----------------------------------------------------------------------------- FlexAttention compatibility
@pytest.mark.parametrize(
    "mod,per_head",
    [(causal_mod, False), (doc_mod, False), (head_mod, True), (lambda b, h, q, kv: (q >= kv) | (h < 0), False)],
)
@pytest.mark.parametrize("q_len,kv_len", [(Q, KV), (5, KV)])
def test_flex_mask_mod(mod, per_head, q_len, kv_len):
    flex = create_mask(mod, 1, H, q_len, kv_len, device="cpu")[0]
    for t in (
        tables.build(mod, q_len=q_len, kv_len=kv_len, heads=H),
        tables.build(custom(mod), q_len=q_len, kv_len=kv_len, heads=H),
    ):
        assert t.mask.shape == (H if per_head else 1, q_len, kv_len)
        assert torch.equal(t.mask.broadcast_to(flex.shape), flex)
    assert torch.equal(materialize(mod, q_len=q_len, kv_len=kv_len, heads=H), flex)
    assert torch.equal(flex, loop_table(mod, H, q_len, kv_len))


def test_flex_and_edgeattn_masks_compose():
    flex = create_mask(lambda b, h, q, kv: doc_mod(b, h, q, kv) & head_mod(b, h, q, kv), 1, H, Q, KV, device="cpu")
    t = tables.build(and_masks(doc_mod, causal(), head_mod), q_len=Q, heads=H)
    assert t.mask.shape[0] == H and torch.equal(t.mask, flex[0])


def test_flex_library_combinators():
    from torch.nn.attention.flex_attention import and_masks as flex_and
    from torch.nn.attention.flex_attention import noop_mask
    from torch.nn.attention.flex_attention import or_masks as flex_or

    for mod in (flex_and(causal_mod, doc_mod), flex_or(doc_mod, head_mod), noop_mask):
        flex = create_mask(mod, 1, H, Q, KV, device="cpu")[0]
        assert torch.equal(tables.build(mod, q_len=Q, heads=H).mask.broadcast_to(flex.shape), flex)


# ----------------------------------------------------------------------------- composition
PAIRS = [
    (causal(), sliding_window(2, causal=False), dict(q_len=9)),
    (sinks(1, 2), custom(doc_mod), dict(q_len=Q)),
    (neighborhood(3), window(4, 2), dict(grid=(8, 8))),
    (segments([0, 0, 1, 1, 2, 2, 2]), sliding_window(1), dict(q_len=4, kv_len=7)),
]


@pytest.mark.parametrize("a,b,shape", PAIRS)
def test_and_or(a, b, shape):
    ma, mb = materialize(a, **shape), materialize(b, **shape)
    for combined, want in ((a & b, ma & mb), (and_masks(a, b), ma & mb), (a | b, ma | mb), (or_masks(a, b), ma | mb)):
        assert isinstance(combined, Mask)
        assert torch.equal(materialize(combined, **shape), want)
        assert torch.equal(tables.build(combined, **shape).mask, want)
    assert (a & b).name == f"{a.name}&{b.name}" and (a | b).name == f"{a.name}|{b.name}"


def test_nested_and_variadic():
    a, b, c = causal(), sliding_window(3, causal=False), custom(doc_mod)
    ma, mb, mc = (materialize(m, q_len=Q) for m in (a, b, c))
    assert torch.equal(materialize(and_masks(a, b, c), q_len=Q), ma & mb & mc)
    assert torch.equal(materialize(or_masks(a, b, c), q_len=Q), ma | mb | mc)
    assert torch.equal(materialize((a | b) & c, q_len=Q), (ma | mb) & mc)
    assert torch.equal(materialize(a | (b & c), q_len=Q), ma | (mb & mc))
    assert torch.equal(materialize(and_masks(a), q_len=Q), ma)
    with pytest.raises(ValueError):
        and_masks()
    with pytest.raises(ValueError, match="mask_mod"):
        and_masks(a, 42)


# ----------------------------------------------------------------------------- bias
def test_bias_mod_matches_loop():
    t = tables.build(custom(causal_mod, bias_mod=dist_bias), q_len=Q, kv_len=KV, heads=H)
    assert t.bias.dtype == torch.float32 and t.bias.shape == (1, Q, KV)
    assert torch.equal(t.bias, loop_table(dist_bias, 1, Q, KV, torch.float32))
    assert torch.equal(t.mask, loop_table(causal_mod, 1, Q, KV))
    bias_only = tables.build(custom(bias_mod=dist_bias), q_len=5, kv_len=8)
    assert bias_only.mask.all() and torch.equal(bias_only.bias, loop_table(dist_bias, 1, 5, 8, torch.float32))


@pytest.mark.parametrize("combine", [and_masks, or_masks])
def test_biases_add(combine):
    m = combine(custom(bias_mod=dist_bias), custom(causal_mod, bias_mod=head_bias), sliding_window(2, causal=False))
    t = tables.build(m, q_len=Q, heads=H)
    want = loop_table(dist_bias, H, Q, KV, torch.float32) + loop_table(head_bias, H, Q, KV, torch.float32)
    assert t.bias.shape == (H, Q, KV) and torch.allclose(t.bias, want)
    assert torch.equal(t.mask[0], materialize(m, q_len=Q)[0])
    assert tables.build(causal() & sliding_window(2), q_len=Q).bias is None


# ----------------------------------------------------------------------------- DenseTable properties
def test_properties_without_bias():
    t = tables.build(custom(lambda b, h, q, kv: (q != 3) & (kv <= q) & (q != 7)), q_len=10, kv_len=10)
    assert t.nbytes == t.mask.numel() == 100 and t.tensors() == (t.mask,)
    assert t.fully_masked_rows == 2
    assert t.density == pytest.approx((55 - 4 - 8) / 100)
    assert tables.build(causal(), q_len=4, kv_len=9).fully_masked_rows == 0


def test_properties_with_bias_and_heads():
    t = tables.build(custom(head_mod, bias_mod=dist_bias), q_len=Q, heads=H)
    assert t.mask.shape == (H, Q, KV) and t.bias.shape == (1, Q, KV)
    assert t.nbytes == H * Q * KV + 4 * Q * KV
    assert t.density == pytest.approx(float(t.mask.float().mean()))
    blocked = tables.build(custom(lambda b, h, q, kv: (q >= kv) & ((h != 1) | (q > 2))), q_len=6, heads=3)
    assert blocked.mask.shape[0] == 3 and blocked.fully_masked_rows == 3


def test_bad_layout_and_mods():
    with pytest.raises(ValueError, match="layout"):
        tables.build(causal(), q_len=4, layout="block")
    with pytest.raises(ValueError, match="mask_mod"):
        custom(lambda q, kv: q >= kv)
    with pytest.raises(ValueError, match="bias_mod"):
        custom(causal_mod, bias_mod="x")
    with pytest.raises(ValueError):
        custom()
    with pytest.raises(ValueError, match="mask_mod"):
        tables.build(custom(lambda b, h, q, kv: torch.ones(3, 3, dtype=torch.bool)), q_len=5)


def test_large_neighborhood_table():
    t = tables.build(neighborhood(7), grid=(56, 56))
    assert t.mask.shape == (1, 3136, 3136) and t.nbytes == 3136 * 3136
    assert (t.mask[0].sum(-1) == 49).all()
    assert t.density == pytest.approx(49 / 3136)
    # spot-check rows (incl. around the default row-chunk boundary) against the per-axis rule
    for row in (0, 57, 1000, 2674, 2675, 2676, 3135):
        r, c = divmod(row, 56)
        keys = set(t.mask[0, row].nonzero().flatten().tolist())
        cr, cc = min(max(r, 3), 52), min(max(c, 3), 52)
        assert keys == {y * 56 + x for y in range(cr - 3, cr + 4) for x in range(cc - 3, cc + 4)}


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda b, h, q, kv: (q - kv).float(), "must return a bool tensor"),
        (lambda b, h, q, kv: None, "must return a tensor"),
        (lambda b, h, q, kv: torch.ones(3, 3, dtype=torch.bool), "must broadcast"),
    ],
)
def test_bad_mask_mods_are_clear_errors(fn, message):
    with pytest.raises(ValueError, match=message):
        tables.build(fn, q_len=5)
    with pytest.raises(ValueError, match=message):
        materialize(fn, q_len=5)


def test_heads_must_be_positive():
    with pytest.raises(ValueError, match="heads must be in"):
        tables.build(causal(), q_len=4, heads=0)
