"""Radial and CLEAR masks: dense and block tables against materialize() and brute-force loops written from the
references' rules (Radial Attention's gen_log_mask_shrinked, CLEAR's local_mask; in reference/masks.py), plus worked
examples."""

import pytest
import torch

from edgeattn import tables
from edgeattn.masks import FAMILIES, clear, materialize, radial

from reference.masks import ref_clear, ref_radial


def check_tables(mask, expected, **shape):
    assert torch.equal(materialize(mask, **shape)[0], expected)
    dense = tables.build(mask, **shape)
    assert torch.equal(dense.mask[0], expected)
    blocked = tables.build(mask, layout="blocked", **shape)
    assert torch.equal(blocked.to_dense().mask[0], expected)
    assert blocked.fully_masked_rows == 0 and abs(blocked.density - expected.float().mean().item()) < 1e-6
    return blocked


# ----------------------------------------------------------------------------- radial
RADIAL_CASES = [  # frames, tokens per frame, block, decay, sink, text
    (5, 12, 4, 1.0, False, 0),
    (6, 8, 4, 1.0, True, 3),
    (4, 6, 4, 0.5, True, 0),
    (3, 10, 6, 1.0, False, 2),
    (8, 16, 8, 0.2, True, 0),
    (4, 130, 8, 1.0, False, 0),
    (3, 200, 40, 0.95, True, 5),
    (4, 72, 16, 0.5, True, 0),
]


@pytest.mark.parametrize("frames,per_frame,block,decay,sink,text", RADIAL_CASES)
def test_radial_tables_match_brute_force(frames, per_frame, block, decay, sink, text):
    mask = radial(frames, block_size=block, decay_factor=decay, sink=sink, text=text)
    expected = ref_radial(frames, per_frame, block, decay, sink, text)
    blocked = check_tables(mask, expected, q_len=frames * per_frame + text)
    assert blocked.tile == (block,)


def test_radial_frame_pattern_with_whole_block_frames():
    """256 tokens per frame, blocks of 128: every kept pair is dense, and the rule works out by hand to distances
    0-3 (window >= 128), even 4-7 (L = 64: every 2nd), 8 and 12 (L = 32: every 4th), plus the sink frame."""
    frames, per_frame = 16, 256
    full = materialize(radial(frames, block_size=128, sink=True), q_len=frames * per_frame)[0]
    pairs = full.view(frames, per_frame, frames, per_frame)
    per_pair = pairs.sum((1, 3))
    assert set(per_pair.unique().tolist()) == {0, per_frame * per_frame}
    expected = torch.tensor(
        [[abs(i - j) in (0, 1, 2, 3, 4, 6, 8, 12) or j == 0 for j in range(frames)] for i in range(frames)]
    )
    assert torch.equal(per_pair > 0, expected)


def test_radial_band_narrows_with_distance():
    """512 tokens per frame, blocks of 64: the band of a frame pair shrinks in blocks as its distance grows."""
    frames, per_frame, block = 16, 512, 64
    full = materialize(radial(frames, block_size=block), q_len=frames * per_frame)[0]
    blocks = full[::block, ::block].view(frames, per_frame // block, frames, per_frame // block)
    widths = {d: int(blocks[0, :, d].sum()) for d in (0, 1, 2, 4, 8)}
    assert widths[0] == widths[1] == 64  # dense for d <= 1
    assert widths[0] > widths[2] > widths[4] >= widths[8] > 0
    assert blocks[0, :, 3].any() and blocks[0, :, 5].any()  # L >= 128 up to d = 7: every distance
    assert not blocks[0, :, 9].any() and not blocks[0, :, 11].any()  # L = 64 from d = 8: odd distances skipped


def test_radial_small_frames_follow_the_reference_rule():
    """Fewer than 128 tokens per frame: the reference's split rule drops adjacent frames too."""
    full = materialize(radial(4, block_size=8), q_len=4 * 64)[0].view(4, 64, 4, 64).any(3).any(1)
    assert torch.equal(full, torch.eye(4, dtype=torch.bool))


def test_radial_block_table_is_sparse_for_the_registered_block():
    t = tables.build(radial(32, block_size=64, sink=True), q_len=32 * 128, layout="auto")
    # a block table, in chunks of consecutive tiles: its scores outgrow the cache (tables.AUTO_CHUNK_BYTES)
    assert t.layout == "bucketed" and all(b.layout == "blocked" for b in t.buckets) and len(t.buckets) > 1
    assert t.work_fraction < 0.4 and t.density < 0.35


def test_radial_names():
    assert radial(16).name == "radial_f16_b128"
    assert radial(16, 64, 0.2, True, 512).name == "radial_f16_b64_decay0.2_sink_text512"


# ----------------------------------------------------------------------------- CLEAR
CLEAR_CASES = [(1, 0, 5, 6), (2, 3, 6, 5), (3, 5, 7, 9), (4, 2, 4, 12), (8, 4, 9, 8)]  # radius, text, H, W


@pytest.mark.parametrize("radius,text,height,width", CLEAR_CASES)
def test_clear_tables_match_brute_force(radius, text, height, width):
    expected = ref_clear(radius, text, height, width)
    check_tables(clear(radius, text=text, image=(height, width)), expected, q_len=text + height * width)
    # the image queries alone against every key (how clear-block runs it)
    tail = ref_clear(radius, text, height, width, q_len=height * width)
    check_tables(
        clear(radius, text=text, image=(height, width)), tail, q_len=height * width, kv_len=text + height * width
    )
    if text == 0:  # the layer's own 2-D grid
        check_tables(clear(radius), expected, grid=(height, width))


def test_clear_disc_is_truncated_not_shifted():
    mask = materialize(clear(3), grid=(9, 9))[0]
    corner, centre = mask[0].view(9, 9), mask[4 * 9 + 4].view(9, 9)
    assert int(centre.sum()) == 25  # lattice points with dy^2 + dx^2 < 9
    assert int(corner.sum()) == 9  # the quarter of it inside the grid; a shifted window would keep 25
    assert corner[2, 2] and not corner[0, 3] and not corner[3, 0]


def test_clear_image_queries_get_a_sparse_block_table():
    t = tables.build(clear(8, text=64, image=(32, 32)), q_len=1024, kv_len=64 + 1024, layout="auto")
    assert t.layout == "blocked" and t.work_fraction < 0.4


def test_clear_names():
    assert clear(8).name == "clear_r8"
    assert clear(8, text=64, image=(32, 32)).name == "clear_r8_text64_img32x32"


# ----------------------------------------------------------------------------- registry and bad input
def test_families_are_registered():
    assert FAMILIES["radial"][0] is radial and FAMILIES["clear"][0] is clear


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: radial(0), "frames"),
        (lambda: radial(4, block_size=0), "block_size"),
        (lambda: radial(4, decay_factor=0), "decay_factor"),
        (lambda: radial(4, decay_factor=float("nan")), "decay_factor"),
        (lambda: radial(4, decay_factor=True), "decay_factor"),
        (lambda: radial(4, sink=1), "sink"),
        (lambda: radial(4, text=-1), "text"),
        (lambda: radial(2.5), "frames"),
        (lambda: clear(0), "radius"),
        (lambda: clear(2.5), "radius"),
        (lambda: clear(3, text=-1), "text"),
        (lambda: clear(3, text=4), "image"),
        (lambda: clear(3, image=(4, 0)), "image"),
        (lambda: clear(3, image=(4, 4, 4)), "image"),
    ],
)
def test_bad_parameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "mask,shape,match",
    [
        (radial(4, block_size=4), dict(q_len=30), "equal frames"),
        (radial(4, block_size=5), dict(q_len=24), "whole blocks"),
        (radial(4, block_size=4, text=3), dict(q_len=3), "equal frames"),
        (radial(4, block_size=4), dict(q_len=16, kv_len=24), "queries = keys"),
        (radial(2, block_size=4), dict(grid=(2, 4)), "frame-major sequence"),
        (clear(2), dict(q_len=16), "grid"),
        (clear(2, text=2, image=(3, 3)), dict(q_len=12), "needs 11 keys"),
        (clear(2, text=2, image=(3, 3)), dict(q_len=12, kv_len=11), "at most as many"),
    ],
)
def test_bad_shapes_raise(mask, shape, match):
    for build in (materialize, tables.build):
        with pytest.raises(ValueError, match=match):
            build(mask, **shape)
