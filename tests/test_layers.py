import pytest
import torch

from edgeattn import masks
from edgeattn.layers import MaskedBlock, MaskedSelfAttention


def test_tables_are_non_persistent_buffers():
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(5, 5), layout="dense")
    assert "table.attn_mask" in dict(layer.named_buffers())
    assert not any("attn_" in k for k in layer.state_dict())
    assert layer.table.attn_mask.dtype == torch.bool and layer.table.attn_mask.shape == (1, 25, 25)
    assert layer.table.table_bytes == 25 * 25


def test_auto_layout_picks_blocks_for_sparse_masks_and_dense_for_causal():
    sparse = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(12, 12))
    assert sparse.table.layout == "blocked"
    assert {"table.attn_kv_index", "table.attn_bank"} <= set(dict(sparse.named_buffers()))
    assert MaskedSelfAttention(16, 2, masks.causal(), seq_len=200).table.layout == "dense"


def test_bucketed_layer_matches_the_dense_layout_and_trains():
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=1024).eval()
    buffers = set(dict(layer.named_buffers()))
    assert {"table.attn_mask", "table.attn_rows", "table.attn_keys_1", "table.attn_order"} <= buffers
    assert len(layer.table.node_tables()) == len(layer.table.table.buckets) > 1
    x = torch.randn(2, 1024, 16, requires_grad=True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    layer.table.use_layout("dense")
    assert not any(n.endswith(("_1", "rows", "order")) for n, _ in layer.named_buffers())
    dense = layer(x)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(dense.square().sum(), x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "mask,shape",
    [
        (masks.neighborhood(5, dilation=2), dict(grid=(14, 13))),
        (masks.window(4, 2), dict(grid=(8, 12))),
        (masks.sliding_window(9), dict(seq_len=70)),
    ],
)
def test_layouts_compute_the_same_attention(mask, shape):
    layer = MaskedSelfAttention(16, 2, mask, layout="dense", **shape).eval()
    x = torch.randn(2, layer.seq_len, 16)
    dense = layer(x)
    layer.table.use_layout("blocked")
    assert layer.table.layout == "blocked" and not hasattr(layer.table, "attn_mask")
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "blocked"])
def test_matches_sdpa_with_the_materialized_mask(layout):
    layer = MaskedSelfAttention(16, 2, masks.sliding_window(3), seq_len=12, layout=layout).eval()
    x = torch.randn(2, 12, 16)
    q, k, v = layer.qkv(x).reshape(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    dense = masks.materialize(masks.sliding_window(3), q_len=12)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    expected = layer.proj(expected.transpose(1, 2).reshape(2, 12, 16))
    torch.testing.assert_close(layer(x), expected)


def test_wrong_token_count_is_a_clear_error():
    block = MaskedBlock(16, 2, masks.neighborhood(3), grid=(4, 4))
    with pytest.raises(ValueError, match="built for 16 tokens, got 9"):
        block(torch.randn(1, 9, 16))


def test_dim_must_split_into_heads():
    with pytest.raises(ValueError, match="heads must be a positive divisor of dim=10"):
        MaskedSelfAttention(10, 3, masks.causal(), seq_len=4)


@pytest.mark.parametrize(
    "mask,grid", [(masks.neighborhood(5, dilation=2, rpb=True), (14, 13)), (masks.window(4, 2, rpb=True), (8, 12))]
)
def test_rpb_layouts_compute_the_same_attention(mask, grid):
    layer = MaskedSelfAttention(16, 2, mask, grid=grid, layout="dense").eval()
    assert layer.rpb.shape == (2, *layer.table.rpb_shape) and "rpb" in layer.state_dict()
    assert "table.attn_rpb_index" in dict(layer.named_buffers()) and not any("attn_" in k for k in layer.state_dict())
    torch.nn.init.normal_(layer.rpb)
    x = torch.randn(2, layer.seq_len, 16)
    dense = layer(x)
    layer.table.use_layout("blocked")
    assert layer.table.attn_rpb_index.shape[1] == 1 and layer.table.attn_rpb_index.dtype == torch.int32
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


def test_rpb_is_the_bias_sdpa_gets():
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3, rpb=True), grid=(5, 6)).eval()
    torch.nn.init.normal_(layer.rpb)
    x = torch.randn(1, 30, 16)
    q, k, v = layer.qkv(x).reshape(1, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)
    index = masks.base.rpb_index(layer.mask, grid=(5, 6))
    bias = layer.rpb.flatten(1)[:, index.clamp(min=0)].masked_fill(index < 0, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(layer(x), layer.proj(expected.transpose(1, 2).reshape(1, 30, 16)))


def test_named_mlp_uses_the_references_keys():
    block = MaskedBlock(16, 2, masks.neighborhood(3), grid=(4, 4), named_mlp=True)
    assert {"mlp.fc1.weight", "mlp.fc2.bias"} <= set(block.state_dict())
    assert "mlp.0.weight" in MaskedBlock(16, 2, masks.neighborhood(3), grid=(4, 4)).state_dict()
