"""Property tests: random parameters and shapes for every mask family, checked against the brute-force references
in reference/ (masks and decay biases, the ones the test_masks*.py modules use), in both table layouts; and the
attention kernels on random masks (fully-masked rows, fp16).

CI runs a modest number of examples; set EDGEATTN_FUZZ_EXAMPLES (e.g. 2000) for a long run."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeattn import tables
from edgeattn.attention import attend
from edgeattn.masks import (
    FAMILIES,
    causal,
    clear,
    custom,
    decay_1d,
    manhattan_decay,
    neighborhood,
    radial,
    segments,
    sinks,
    sliding_window,
    window,
)

from reference.decay import brute_1d, brute_manhattan
from reference.masks import ref_clear, ref_neighborhood, ref_radial, ref_seq, ref_window

EXAMPLES = int(os.environ.get("EDGEATTN_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_both_layouts(mask, ref, tile, **shape):
    want = torch.as_tensor(ref, dtype=torch.bool)
    dense = tables.build(mask, **shape)
    assert torch.equal(dense.mask[0], want), f"{mask.name} dense"
    blocked = tables.build(mask, layout="blocked", tile=tile, **shape)
    assert torch.equal(blocked.to_dense().mask[0], want), f"{mask.name} blocked tile={tile}"
    assert blocked.fully_masked_rows == int((~want.any(-1)).sum())


@st.composite
def neighborhood_case(draw):
    nd = draw(st.integers(1, 3))
    grid, ks, ds, ss, cs = [], [], [], [], []
    for _ in range(nd):
        k = draw(st.integers(2, 5))
        d = draw(st.integers(1, 3))
        length = draw(st.integers(k * d, k * d + (6 if nd < 3 else 2)))
        grid.append(length)
        ks.append(k)
        ds.append(d)
        ss.append(draw(st.integers(1, k)))
        cs.append(draw(st.booleans()))
    tile = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    return tuple(grid), tuple(ks), tuple(ds), tuple(ss), tuple(cs), tile


@FUZZ
@given(neighborhood_case())
def test_fuzz_neighborhood(case):
    grid, k, d, s, c = case[:5]
    check_both_layouts(neighborhood(k, d, s, c), ref_neighborhood(grid, k, d, s, c), case[5], grid=grid)


@FUZZ
@given(st.data())
def test_fuzz_window(data):
    size = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    grid = (size[0] * data.draw(st.integers(1, 3)), size[1] * data.draw(st.integers(1, 3)))
    shift = (data.draw(st.integers(0, size[0] - 1)), data.draw(st.integers(0, size[1] - 1)))
    tile = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)))
    check_both_layouts(window(size, shift), ref_window(grid, size, shift), tile, grid=grid)


@FUZZ
@given(st.data())
def test_fuzz_sequence_masks(data):
    kv_len = data.draw(st.integers(1, 40))
    q_len = data.draw(st.integers(1, kv_len))
    w, n = data.draw(st.integers(1, 12)), data.draw(st.integers(0, 5))
    tile = data.draw(st.integers(1, 16))
    is_causal = data.draw(st.booleans())
    cases = [
        (causal(), lambda q, k: k <= q),
        (
            sliding_window(w, causal=is_causal),
            (lambda q, k: 0 <= q - k <= w) if is_causal else (lambda q, k: abs(q - k) <= w),
        ),
        (sinks(n, w), lambda q, k: k <= q and (k < n or q - k <= w)),
    ]
    for mask, pred in cases:
        check_both_layouts(mask, ref_seq(pred, q_len, kv_len), tile, q_len=q_len, kv_len=kv_len)


@FUZZ
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.data())
def test_fuzz_segments(steps, data):
    ids = [sum(steps[: i + 1]) for i in range(len(steps))]  # non-decreasing, with repeats
    q_len = data.draw(st.integers(1, len(ids)))
    pred = lambda q, k: ids[k] == ids[q] or (ids[k] < ids[q] and k <= q)  # noqa: E731
    check_both_layouts(
        segments(ids), ref_seq(pred, q_len, len(ids)), data.draw(st.integers(1, 8)), q_len=q_len, kv_len=len(ids)
    )


@FUZZ
@given(st.data())
def test_fuzz_radial(data):
    # Below 128 tokens per frame the reference keeps only same-frame pairs for up to 6 frames (its split rule), so
    # half the cases take 128-160 tokens per frame, where adjacent frames and even distances (with the decayed band)
    # are kept too; blocks there stay small to keep the brute force quick.
    if data.draw(st.booleans()):
        frames, per_frame, max_block = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 20)), None
    else:
        frames, per_frame, max_block = data.draw(st.integers(3, 5)), data.draw(st.integers(128, 160)), 32
    video = frames * per_frame
    block = data.draw(st.sampled_from([b for b in range(1, (max_block or video) + 1) if video % b == 0]))
    decay = data.draw(st.floats(0.0, 4.0, exclude_min=True))  # the band is 64*decay wide at distance 2 there
    sink, text = data.draw(st.booleans()), data.draw(st.integers(0, 3))
    mask = radial(frames, block_size=block, decay_factor=decay, sink=sink, text=text)
    check_both_layouts(
        mask, ref_radial(frames, per_frame, block, decay, sink, text), data.draw(st.integers(1, 16)), q_len=video + text
    )


@FUZZ
@given(st.data())
def test_fuzz_clear(data):
    radius, text = data.draw(st.integers(1, 5)), data.draw(st.integers(0, 4))
    height, width = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    n = text + height * width
    q_len = data.draw(st.integers(1, n))  # the last q_len tokens query every key
    tile = data.draw(st.integers(1, 16))
    check_both_layouts(
        clear(radius, text=text, image=(height, width)),
        ref_clear(radius, text, height, width, q_len),
        tile,
        q_len=q_len,
        kv_len=n,
    )
    if text == 0:  # the layer's own 2-D grid, with 2-D tiles
        tile = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
        check_both_layouts(clear(radius), ref_clear(radius, 0, height, width), tile, grid=(height, width))


def check_decay(mask, want, tile, **shape):
    """Both layouts allow every key and carry the brute-force bias: float64 log(gamma) * distance there, one float32
    rounding of log(gamma) and one of the product here, so within a few float32 ulps (relative)."""
    heads = want.shape[0]
    for table in (
        tables.build(mask, heads=heads, **shape),
        tables.build(mask, heads=heads, layout="blocked", tile=tile, **shape).to_dense(),
    ):
        assert table.mask.all() and table.fully_masked_rows == 0
        assert table.bias.dtype == torch.float32
        torch.testing.assert_close(table.bias.double().expand_as(want), want, rtol=2.0**-22, atol=0.0)


GAMMAS = st.lists(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True), min_size=1, max_size=4)


@FUZZ
@given(st.data())
def test_fuzz_manhattan_decay(data):
    grid = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    gammas = data.draw(GAMMAS)
    tile = tuple(data.draw(st.integers(1, 4)) for _ in grid)
    check_decay(manhattan_decay(gammas), brute_manhattan(grid, gammas), tile, grid=grid)


@FUZZ
@given(st.data())
def test_fuzz_decay_1d(data):
    kv_len = data.draw(st.integers(1, 40))
    q_len = data.draw(st.integers(1, kv_len))
    gammas = data.draw(GAMMAS)
    check_decay(
        decay_1d(gammas), brute_1d(q_len, kv_len, gammas), data.draw(st.integers(1, 16)), q_len=q_len, kv_len=kv_len
    )


def test_every_family_is_fuzzed():
    fuzzed = {
        "neighborhood",
        "window",
        "causal",
        "sliding_window",
        "sinks",
        "segments",
        "manhattan_decay",
        "decay_1d",
        "radial",
        "clear",
    }
    assert fuzzed == set(FAMILIES)


@FUZZ
@given(st.data())
def test_fuzz_kernels_on_random_masks(data):
    """Random masks with fully-masked rows: both layouts agree, rows without keys are zeros, never NaN; fp16 too."""
    n = data.draw(st.integers(2, 24))
    density = data.draw(st.floats(0.0, 1.0))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(2, n, n, generator=gen) < density
    mask = custom(lambda b, h, q, kv: table[h, q, kv], name="random")
    dense = tables.build(mask, q_len=n, heads=2)
    blocked = tables.build(mask, q_len=n, heads=2, layout="blocked", tile=data.draw(st.integers(1, 8)))
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(3))
    empty = ~table.any(-1)  # (heads, n)
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
        args = [t.to(dtype) for t in (q, k, v)]
        want = attend(*args, "dense", [dense.mask, None])
        got = attend(*args, "blocked", [*blocked.tensors(), None])
        assert not torch.isnan(got).any() and not torch.isnan(want).any()
        assert torch.all(got[0][empty] == 0) and torch.all(want[0][empty] == 0)
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)
        if dtype == torch.float16:
            ref = attend(q, k, v, "dense", [dense.mask, None])
            torch.testing.assert_close(got.float(), ref, atol=atol, rtol=atol)
