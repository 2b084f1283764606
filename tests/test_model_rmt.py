"""rmt-t: checkpoint key compatibility, decay tables, separable/full retention against the direct formulas, and
export parity on onnxruntime and OpenVINO."""

import math

import pytest
import torch

from edgeattn import models, parity
from edgeattn.layers import MaskTable
from edgeattn.models.rmt import RetentionRelPos2d, VisionRetentionAll, VisionRetentionChunk, VisRetNet
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES

DIMS, DEPTHS, HEADS, RANGES, MLP, PROJECTION, CLASSES = (
    (64, 128, 256, 512),
    (2, 2, 8, 2),
    (4, 4, 8, 16),
    (4, 4, 6, 6),
    3,
    1024,
    1000,
)
GRIDS = (56, 28, 14, 7)  # tokens per side of each stage for 224x224 images


def reference_state_dict_shapes():
    """Key -> shape of the official RMT_T3 checkpoint, from the modules of classfication_release/RMT.py
    (github.com/qhfan/RMT): VisRetNet(patch_embed, layers[BasicLayer(Relpos, blocks[RetBlock], downsample)],
    proj, norm, head)."""
    shapes = {}

    def linear(name, fan_in, fan_out):
        shapes.update({f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)})

    def conv(name, c_in, c_out, k, depthwise=False):
        shapes.update({f"{name}.weight": (c_out, 1 if depthwise else c_in, k, k), f"{name}.bias": (c_out,)})

    def batchnorm(name, c):
        shapes.update({f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{name}.num_batches_tracked"] = ()

    def layernorm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    half = DIMS[0] // 2  # PatchEmbed.proj: conv, BN, GELU, conv, BN, GELU, conv, BN, GELU, conv, BN
    for index, (c_in, c_out) in zip((0, 3, 6, 9), ((3, half), (half, half), (half, DIMS[0]), (DIMS[0], DIMS[0]))):
        conv(f"patch_embed.proj.{index}", c_in, c_out, 3)
        batchnorm(f"patch_embed.proj.{index + 1}", c_out)
    for i, (dim, depth, heads) in enumerate(zip(DIMS, DEPTHS, HEADS)):
        layer = f"layers.{i}"
        shapes[f"{layer}.Relpos.angle"] = (dim // heads,)
        shapes[f"{layer}.Relpos.decay"] = (heads,)
        for j in range(depth):
            block = f"{layer}.blocks.{j}"
            layernorm(f"{block}.retention_layer_norm", dim)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{block}.retention.{proj}", dim, dim)
            conv(f"{block}.retention.lepe.conv", dim, dim, 5, depthwise=True)
            layernorm(f"{block}.final_layer_norm", dim)
            linear(f"{block}.ffn.fc1", dim, MLP * dim)
            linear(f"{block}.ffn.fc2", MLP * dim, dim)
            conv(f"{block}.ffn.dwconv.conv", MLP * dim, MLP * dim, 3, depthwise=True)
            conv(f"{block}.pos.conv", dim, dim, 3, depthwise=True)
        if i + 1 < len(DIMS):
            conv(f"{layer}.downsample.reduction", dim, DIMS[i + 1], 3)
            batchnorm(f"{layer}.downsample.norm", DIMS[i + 1])
    linear("proj", DIMS[-1], PROJECTION)
    batchnorm("norm", PROJECTION)
    linear("head", PROJECTION, CLASSES)
    return shapes


def reference_log_gammas(heads, heads_range, initial_value=2):
    return [math.log(1 - 2 ** -(initial_value + heads_range * h / heads)) for h in range(heads)]


@pytest.fixture(scope="module")
def rmt():
    return models.build("rmt-t").module


def test_official_checkpoint_keys_load_strictly(rmt):
    expected = reference_state_dict_shapes()
    assert {k: tuple(v.shape) for k, v in rmt.state_dict().items()} == expected
    generator = torch.Generator().manual_seed(1)
    checkpoint = {k: torch.randn(shape, generator=generator) for k, shape in expected.items()}
    for k in checkpoint:
        if k.endswith("num_batches_tracked"):
            checkpoint[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            checkpoint[k] = checkpoint[k].abs() + 0.5
        elif k.endswith("Relpos.decay"):  # log-decays: negative (a positive one is refused, see below)
            checkpoint[k] = -checkpoint[k].abs()
    model = VisRetNet().eval()
    model.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(v, checkpoint[k].to(v.dtype)) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_relpos_buffers_hold_the_reference_values(rmt):
    # float32 like the reference: 1 - 2^-x rounds to ~6e-8, so the log-decays agree to an absolute 2e-7
    for layer, heads, heads_range in zip(rmt.layers, HEADS, RANGES):
        assert torch.allclose(
            layer.Relpos.decay.double(),
            torch.tensor(reference_log_gammas(heads, heads_range), dtype=torch.float64),
            rtol=0,
            atol=2e-7,
        )
        half = layer.Relpos.angle.numel() // 2
        angle = [10000 ** (-j / (half - 1)) for j in range(half) for _ in range(2)]
        assert torch.allclose(layer.Relpos.angle.double(), torch.tensor(angle, dtype=torch.float64), rtol=1e-6)


def test_decay_tables_are_log_gamma_times_manhattan_distance(rmt):
    names = [m.mask.name.split("_g")[0] for m in rmt.modules() if isinstance(m, MaskTable)]
    assert names == ["decay_1d"] * 4 + ["manhattan_decay"] * 2
    for i, (layer, side, heads, heads_range) in enumerate(zip(rmt.layers, GRIDS, HEADS, RANGES)):
        log_gammas = reference_log_gammas(heads, heads_range)
        relpos = layer.Relpos
        assert relpos.chunkwise == (i < 2) and relpos.grid == (side, side)
        if relpos.chunkwise:  # separable stages: |dx| along a row, |dy| along a column (square grids here)
            want = torch.tensor([[[g * abs(a - b) for b in range(side)] for a in range(side)] for g in log_gammas])
            for table in (relpos.table_w, relpos.table_h):
                assert table.layout == "dense" and table.attn_mask.all()
                assert torch.allclose(table.attn_bias, want, rtol=1e-5, atol=1e-5)
        else:  # full stages: |dy| + |dx| between flat tokens
            cells = [(y, x) for y in range(side) for x in range(side)]
            distance = torch.tensor([[abs(a[0] - b[0]) + abs(a[1] - b[1]) for b in cells] for a in cells])
            want = torch.tensor(log_gammas)[:, None, None] * distance
            assert relpos.table.layout == "dense" and relpos.table.attn_mask.all()
            assert torch.allclose(relpos.table.attn_bias, want, rtol=1e-5, atol=1e-5)


def _direct_retention(module, x, chunkwise, freq_scale=1.0, decay_scale=1.0):
    """The reference's retention written out with explicit softmax, complex-number rotary and loops over the
    decay: checks the edgeattn-op version (tables, reshapes, row-then-column order) against the formulas.
    ``freq_scale`` / ``decay_scale`` multiply the rotary frequencies and the log-decays (a checkpoint's other
    ``angle`` / ``decay`` buffers)."""
    B, H, W, C = x.shape
    n, d = module.heads, C // module.heads
    heads_first = lambda t: t.view(B, H, W, n, d).permute(0, 3, 1, 2, 4)  # noqa: E731
    position = torch.arange(H * W, dtype=torch.float64).view(H, W, 1)
    freq = torch.tensor([10000 ** (-j / (d // 2 - 1)) for j in range(d // 2)], dtype=torch.float64) * freq_scale
    rotation = torch.polar(torch.ones(H, W, d // 2, dtype=torch.float64), position * freq)

    def rotate(t):
        return torch.view_as_real(
            torch.view_as_complex(t.double().unflatten(-1, (-1, 2)).contiguous()) * rotation
        ).flatten(-2)

    q = rotate(heads_first(module.q_proj(x)))
    k = rotate(heads_first(module.k_proj(x))) * d**-0.5
    v = heads_first(module.v_proj(x)).double()
    log_gamma = torch.tensor(reference_log_gammas(n, 4), dtype=torch.float64).view(n, 1, 1) * decay_scale
    if chunkwise:
        decay_w = log_gamma * (torch.arange(W)[:, None] - torch.arange(W)).abs()
        rows = torch.softmax(torch.einsum("bnhwd,bnhvd->bnhwv", q, k) + decay_w[:, None], -1)
        v = torch.einsum("bnhwv,bnhvd->bnhwd", rows, v)
        decay_h = log_gamma * (torch.arange(H)[:, None] - torch.arange(H)).abs()
        cols = torch.softmax(torch.einsum("bnhwd,bngwd->bnwhg", q, k) + decay_h[:, None], -1)
        out = torch.einsum("bnwhg,bngwd->bnhwd", cols, v)
    else:
        yx = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).view(-1, 2)
        decay = log_gamma * (yx[:, None] - yx[None]).abs().sum(-1)
        scores = torch.einsum("bnld,bnmd->bnlm", q.flatten(2, 3), k.flatten(2, 3)) + decay
        out = torch.einsum("bnlm,bnmd->bnld", torch.softmax(scores, -1), v.flatten(2, 3)).unflatten(2, (H, W))
    out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C).float()
    return module.out_proj(out + module.lepe(module.v_proj(x)))


@pytest.mark.parametrize("chunkwise", [True, False], ids=["separable", "full"])
def test_retention_matches_the_direct_formula(chunkwise):
    grid = (5, 7)  # not square: a swapped row/column would show
    relpos = RetentionRelPos2d(32, 2, initial_value=2, heads_range=4, grid=grid, chunkwise=chunkwise)
    module = (VisionRetentionChunk if chunkwise else VisionRetentionAll)(32, 2).eval()
    x = torch.randn(2, *grid, 32)
    with torch.no_grad():
        got, want = module(x, relpos), _direct_retention(module, x, chunkwise)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("chunkwise", [True, False], ids=["separable", "full"])
def test_retention_follows_loaded_angle_and_decay(chunkwise):
    # The reference computes its rotation and decay from these buffers on every call: a checkpoint whose values
    # differ from the formula's (here scaled by 1.5 and 0.7) must give the formula's outputs for those values.
    grid = (5, 7)
    relpos = RetentionRelPos2d(32, 2, initial_value=2, heads_range=4, grid=grid, chunkwise=chunkwise)
    relpos.load_state_dict({"angle": relpos.angle * 1.5, "decay": relpos.decay * 0.7}, strict=True)
    module = (VisionRetentionChunk if chunkwise else VisionRetentionAll)(32, 2).eval()
    x = torch.randn(2, *grid, 32)
    with torch.no_grad():
        got = module(x, relpos)
        want = _direct_retention(module, x, chunkwise, freq_scale=1.5, decay_scale=0.7)
        formula = _direct_retention(module, x, chunkwise)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, formula, atol=1e-3)  # the loaded values matter


def test_loaded_decay_gives_the_outputs_of_the_model_it_was_saved_from():
    # Same seed, so the same weights; only the decay buffers differ (init_values 3 instead of 2).
    small = dict(image_size=48, embed_dims=[16] * 4, depths=[1] * 4, heads=[2] * 4)
    ours, theirs = models.build("rmt-t", **small), models.build("rmt-t", init_values=[3] * 4, **small)
    with torch.no_grad():
        before = ours.module(**ours.inputs)
        ours.module.load_state_dict(theirs.module.state_dict(), strict=True)
        after, want = ours.module(**ours.inputs), theirs.module(**theirs.inputs)
    assert torch.equal(after, want) and not torch.allclose(before, want)


def test_a_decay_that_is_no_decay_rate_is_refused():
    relpos = RetentionRelPos2d(32, 2, initial_value=2, heads_range=4, grid=(3, 3), chunkwise=False)
    with pytest.raises(
        RuntimeError,
        match=r"decay: cannot build the decay tables from the checkpoint's values: "
        r"manhattan_decay gammas must be in \(0, 1\]",
    ):
        relpos.load_state_dict({"angle": relpos.angle, "decay": -relpos.decay})


def test_rmt_t_exports_and_matches_on_onnx_runtimes(tmp_path):
    result = export_registered("rmt-t", tmp_path / "m.onnx")
    assert len(result.masks) == sum(DEPTHS[:2]) * 2 + sum(DEPTHS[2:])  # separable blocks run two attentions
    assert result.table_bytes < 2e6  # one table per stage, shared by its blocks
    assert {m["lowering"] for m in result.masks} == {"dense"}  # all-allowed masks: dense tables
    rows = parity.check_file(result.path, CPU_RUNTIMES, runs=1)
    for row in rows:
        assert row.ok, parity.format_table(rows)
        assert row.max_abs_err <= 1e-4, parity.format_table(rows)


def test_wrong_image_size_and_bad_config_are_clear_errors(rmt):
    with pytest.raises(ValueError, match=r"built for \(batch, 3, 224, 224\) images, got \(1, 3, 192, 192\)"):
        rmt(torch.randn(1, 3, 192, 192))
    with pytest.raises(ValueError, match="heads needs one entry per stage"):
        VisRetNet(heads=(4, 4, 8))
    with pytest.raises(ValueError, match="heads must be a positive divisor of embed_dim=64"):
        VisionRetentionAll(64, 3)
