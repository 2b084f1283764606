"""Our neighborhood masks against NATTEN itself: its FlexAttention mask_mod (natten.backends.flex) runs on CPU.

NATTEN builds from source without CUDA as a pure-Python package: ``pip install --no-build-isolation natten==0.21.7``
(the README's test command does it).  CI must have it; elsewhere the test is skipped with that hint.
"""

import os
import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from edgeattn.masks import materialize, neighborhood

if os.environ.get("CI"):
    import natten.backends.flex as natten_flex
else:
    natten_flex = pytest.importorskip("natten.backends.flex", reason="pip install --no-build-isolation natten==0.21.7")


def natten_mask(grid, kernel, dilation, stride, causal):
    block_mask = natten_flex.get_na_flex_mask("cpu", len(grid), grid, kernel, stride, dilation, causal)
    n = 1
    for g in grid:
        n *= g
    return create_mask(block_mask.mask_mod, 1, 1, n, n, device="cpu")[0, 0]


def random_configs(count, seed=0):
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        ndim = rng.choice([1, 1, 2, 2, 3])
        grid, kernel, dilation, stride, causal = [], [], [], [], []
        for _ in range(ndim):
            length = rng.randint(2, {1: 40, 2: 12, 3: 6}[ndim])
            k = rng.randint(2, length)
            d = rng.randint(1, length // k)
            grid.append(length), kernel.append(k), dilation.append(d)
            stride.append(rng.randint(1, k)), causal.append(rng.random() < 0.3)
        configs.append(tuple(map(tuple, (grid, kernel, dilation, stride, causal))))
    return configs


EDGE_CASES = [
    ((7,), (3,), (1,), (1,), (False,)),
    ((8,), (4,), (1,), (1,), (False,)),  # even kernel leans left
    ((9,), (3,), (2,), (1,), (False,)),  # dilation, unequal group lengths
    ((9,), (3,), (3,), (1,), (True,)),  # kernel * dilation == length, causal
    ((7,), (4,), (1,), (3,), (False,)),  # partial last stride block
    ((8,), (4,), (1,), (2,), (True,)),  # causal + stride
    ((14, 14), (7, 7), (1, 2), (1, 1), (False, False)),
    ((6, 10), (3, 5), (2, 1), (3, 2), (True, False)),
    ((4, 6, 5), (2, 3, 5), (2, 1, 1), (1, 2, 3), (False, True, False)),
]


@pytest.mark.parametrize("grid, kernel, dilation, stride, causal", EDGE_CASES + random_configs(150))
def test_neighborhood_matches_natten(grid, kernel, dilation, stride, causal):
    ours = materialize(neighborhood(kernel, dilation=dilation, stride=stride, causal=causal), grid=grid)[0]
    theirs = natten_mask(grid, kernel, dilation, stride, causal)
    assert torch.equal(ours, theirs), f"first differing query: {(ours != theirs).any(-1).nonzero()[0].item()}"


RPB_CASES = [
    c
    for c in EDGE_CASES + random_configs(60, seed=1)
    if all(k % 2 for k in c[1]) and all(s == 1 for s in c[3]) and not any(c[4])
]


@pytest.mark.parametrize("grid, kernel, dilation, stride, causal", RPB_CASES)
def test_rpb_masks_allow_the_natten_pairs(grid, kernel, dilation, stride, causal):
    # the relative position bias adds values, never pairs (its indices: tests/test_tables_rpb.py)
    ours = materialize(neighborhood(kernel, dilation=dilation, rpb=True), grid=grid)[0]
    assert torch.equal(ours, natten_mask(grid, kernel, dilation, stride, causal))
