import pytest
import torch

from edgeattn import masks
from edgeattn.layers import MaskedBlock, MaskedSelfAttention


def test_tables_are_non_persistent_buffers():
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(5, 5))
    assert "attn_mask" in dict(layer.named_buffers())
    assert not any("attn_mask" in k for k in layer.state_dict())
    assert layer.attn_mask.dtype == torch.bool and layer.attn_mask.shape == (1, 25, 25)
    assert layer.table_bytes == 25 * 25


def test_matches_sdpa_with_the_materialized_mask():
    layer = MaskedSelfAttention(16, 2, masks.sliding_window(3), seq_len=12).eval()
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
