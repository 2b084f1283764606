import math

import pytest
import torch

from edgeattn import tables
from edgeattn.attention import attend, masked_attention, reference_attention
from edgeattn.masks import neighborhood, sinks, window

from reference.attention import naive_attention


@pytest.mark.parametrize("heads_in_table", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_rowwise_softmax(heads_in_table, with_bias):
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    mask = torch.rand(heads_in_table, 10, 10) > 0.6
    mask[0, 4] = False  # a query with no key
    bias = torch.randn(heads_in_table, 10, 10) if with_bias else None
    scale = 1 / math.sqrt(4)
    got = reference_attention(q, k, v, mask, bias, scale)
    want = naive_attention(q, k, v, mask, bias, scale)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, :, 4] == 0) if heads_in_table == 1 else torch.all(got[:, 0, 4] == 0)
    assert not got.isnan().any()


def test_custom_op_is_registered_and_consistent():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    mask = torch.tril(torch.ones(1, 6, 6, dtype=torch.bool))
    torch.library.opcheck(torch.ops.edgeattn.masked_attention.default, (q, k, v, [mask], None, "dense", 0.5))
    torch.testing.assert_close(
        masked_attention(q, k, v, mask, scale=0.5), reference_attention(q, k, v, mask, None, 0.5)
    )


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (torch.randn(1, 1, 5, 16) for _ in range(3))
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(masked_attention(q, k, v, mask), expected)


def test_gradients_match_sdpa():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 6, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tril(torch.ones(1, 6, 6, dtype=torch.bool))
    torch.autograd.gradcheck(lambda q, k, v, b: masked_attention(q, k, v, mask, b), (q, k, v, bias))


def test_float_masks_are_refused():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        masked_attention(q, q, q, torch.zeros(1, 4, 4))


BLOCKED = [
    (neighborhood(5), dict(grid=(13, 11))),
    (neighborhood((3, 2), (1, 2), (2, 1), (True, False)), dict(grid=(6, 5))),
    (window(4, 2), dict(grid=(8, 8))),
    (sinks(2, 3), dict(q_len=5, kv_len=11)),
]


@pytest.mark.parametrize("mask,shape", BLOCKED, ids=[m.name for m, _ in BLOCKED])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blocked_kernel_matches_dense(mask, shape, with_bias):
    if with_bias:  # a relative-position bias, different per head, to exercise the bias bank
        from edgeattn.masks import custom

        mask = mask & custom(bias_mod=lambda b, h, q, kv: (h + 1) * 0.1 * (q - kv).float().cos(), name="cosbias")
    blocked = tables.build(mask, heads=2, layout="blocked", **shape)
    dense = tables.build(mask, heads=2, **shape)
    q = torch.randn(2, 2, dense.shape.q_len, 8)
    k, v = (torch.randn(2, 2, dense.shape.kv_len, 8) for _ in range(2))
    got = attend(q, k, v, "blocked", [*blocked.tensors(), None][:6])
    torch.testing.assert_close(got, attend(q, k, v, "dense", [dense.mask, dense.bias]), atol=1e-5, rtol=1e-5)


def test_blocked_gradients_and_opcheck():
    blocked = tables.build(neighborhood((3, 2), (1, 2), (2, 1), (True, False)), grid=(6, 5), layout="blocked")
    q, k, v = (torch.randn(1, 2, 30, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, "blocked", [*blocked.tensors(), None]), (q, k, v))
    torch.library.opcheck(
        torch.ops.edgeattn.masked_attention.default,
        (q.detach(), k.detach(), v.detach(), list(blocked.tensors()), None, "blocked", 0.5),
    )
