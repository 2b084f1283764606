"""nat-mini, dinat-mini and swin-t: the references' state-dict keys, their blocks against literal re-computations
of the references, learned relative position biases through export, and export parity on onnxruntime and OpenVINO.

Reference key lists are written here from the reference code: SHI-Labs/Neighborhood-Attention-Transformer
classification/nat.py (ConvTokenizer, NATLayer, NATBlock, ConvDownsampler, NAT; dinat.py adds only dilations) with
NATTEN's NeighborhoodAttention2D(rel_pos_bias=True) (qkv, rpb, proj), and microsoft/Swin-Transformer
models/swin_transformer.py (PatchEmbed, SwinTransformerBlock with its attn_mask buffer, WindowAttention with
relative_position_bias_table and the relative_position_index buffer, PatchMerging, BasicLayer, SwinTransformer).
"""

import math

import onnx
import pytest
import torch

from edgeattn import export_onnx, models, parity, tables
from edgeattn.layers import MaskedBlock, MaskedSelfAttention, MaskTable
from edgeattn.masks import neighborhood, window
from edgeattn.models.swin import PatchMerging, SwinBlock
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES
from reference.attention import natten_attention
from reference.masks import swin_attn_mask
from reference.rpb import swin_relative_position_index

ZOO = ["nat-mini", "dinat-mini", "swin-t"]


# ----------------------------------------------------------------------------- reference state-dict keys
def _norm(prefix, dim):
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _linear(prefix, n_in, n_out, bias=True):
    return {f"{prefix}.weight": (n_out, n_in), **({f"{prefix}.bias": (n_out,)} if bias else {})}


def _block(prefix, dim, mlp_ratio):
    hidden = int(dim * mlp_ratio)
    return {
        **_norm(f"{prefix}.norm1", dim),
        **_linear(f"{prefix}.attn.qkv", dim, 3 * dim),
        **_linear(f"{prefix}.attn.proj", dim, dim),
        **_norm(f"{prefix}.norm2", dim),
        **_linear(f"{prefix}.mlp.fc1", dim, hidden),
        **_linear(f"{prefix}.mlp.fc2", hidden, dim),
    }


def nat_keys(embed=64, depths=(3, 4, 6, 5), heads=(2, 4, 8, 16), kernel=7, mlp_ratio=3, classes=1000):
    keys = {
        "patch_embed.proj.0.weight": (embed // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": (embed // 2,),
        "patch_embed.proj.1.weight": (embed, embed // 2, 3, 3),
        "patch_embed.proj.1.bias": (embed,),
        **_norm("patch_embed.norm", embed),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed * 2**i
        for j in range(depth):
            keys.update(_block(f"levels.{i}.blocks.{j}", dim, mlp_ratio))
            keys[f"levels.{i}.blocks.{j}.attn.rpb"] = (h, 2 * kernel - 1, 2 * kernel - 1)
        if i + 1 < len(depths):
            keys[f"levels.{i}.downsample.reduction.weight"] = (2 * dim, dim, 3, 3)
            keys.update(_norm(f"levels.{i}.downsample.norm", 2 * dim))
    features = embed * 2 ** (len(depths) - 1)
    return {**keys, **_norm("norm", features), **_linear("head", features, classes)}


def swin_keys(
    image=224, patch=4, embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4, classes=1000
):
    keys = {
        "patch_embed.proj.weight": (embed, 3, patch, patch),
        "patch_embed.proj.bias": (embed,),
        **_norm("patch_embed.norm", embed),
    }
    side = image // patch
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim, res = embed * 2**i, side >> i
        w = min(window_size, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            keys.update(_block(p, dim, mlp_ratio))
            keys[f"{p}.attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, h)
            keys[f"{p}.attn.relative_position_index"] = (w * w, w * w)
            if j % 2 and res > window_size:  # shifted blocks; a window covering the map is not shifted
                keys[f"{p}.attn_mask"] = ((res // w) ** 2, w * w, w * w)
        if i + 1 < len(depths):
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            keys.update(_norm(f"layers.{i}.downsample.norm", 4 * dim))
    features = embed * 2 ** (len(depths) - 1)
    return {**keys, **_norm("norm", features), **_linear("head", features, classes)}


REFERENCE_KEYS = {"nat-mini": nat_keys, "dinat-mini": nat_keys, "swin-t": swin_keys}


def reference_checkpoint(name, generator):
    """A checkpoint with the reference's keys: random weights, Swin's derived buffers as Swin computes them."""
    state = {}
    for key, shape in REFERENCE_KEYS[name]().items():
        if key.endswith("relative_position_index"):
            state[key] = swin_relative_position_index(math.isqrt(shape[0]))
        elif key.endswith("attn_mask"):
            w = math.isqrt(shape[1])
            state[key] = swin_attn_mask(math.isqrt(shape[0]) * w, w, w // 2)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = models.build(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_and_shapes_are_the_references(name, zoo):
    got = {k: tuple(v.shape) for k, v in zoo(name).module.state_dict().items()}
    want = REFERENCE_KEYS[name]()
    assert sorted(set(got) ^ set(want)) == [] and got == want


@pytest.mark.parametrize("name", ZOO)
def test_reference_checkpoint_loads_strictly_and_drives_the_output(name, zoo):
    built = zoo(name)
    model, image = built.module, built.inputs["image"]
    checkpoint = reference_checkpoint(name, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model.load_state_dict(checkpoint, strict=True)
        loaded = model(image)
        bias_key = next(k for k in checkpoint if k.endswith((".attn.rpb", "relative_position_bias_table")))
        checkpoint[bias_key] = checkpoint[bias_key] + 1.0  # only the first block's relative position bias
        model.load_state_dict(checkpoint, strict=True)
        moved = model(image)
    assert all(torch.equal(v, checkpoint[k]) for k, v in model.state_dict().items())
    assert torch.isfinite(loaded).all() and not torch.allclose(loaded, moved)


def test_swin_checkpoint_with_other_derived_buffers_is_refused(zoo):
    model = zoo("swin-t").module
    good = reference_checkpoint("swin-t", torch.Generator().manual_seed(2))
    for key in ("layers.0.blocks.1.attn_mask", "layers.2.blocks.0.attn.relative_position_index"):
        bad = dict(good)
        bad[key] = bad[key].flip(-1)
        with pytest.raises(RuntimeError, match=key.replace(".", r"\.") + ": the checkpoint's values differ"):
            model.load_state_dict(bad)
        # the refused values were not copied in, so the buffer still matches the mask and the right checkpoint loads
        assert torch.equal(model.state_dict()[key], good[key].to(model.state_dict()[key].dtype))
        model.load_state_dict(good)
    missing = {k: v for k, v in good.items() if k != "layers.1.blocks.1.attn_mask"}
    with pytest.raises(RuntimeError, match="Missing key.*layers.1.blocks.1.attn_mask"):
        model.load_state_dict(missing)


def test_swin_without_the_derived_buffers_loads_its_own_state():
    # swin-tiny-block has no relative position bias, so no relative_position_index to compare against
    model = models.build("swin-tiny-block").module
    assert "blocks.0.attn.relative_position_index" not in model.state_dict()
    model.load_state_dict(models.build("swin-tiny-block", seed=1).module.state_dict(), strict=True)


# ----------------------------------------------------------------------------- blocks against the references
@pytest.mark.parametrize("layout", ["dense", "blocked"])
@pytest.mark.parametrize("grid, kernel, dilation", [((9, 11), 5, 1), ((12, 13), 3, 3), ((7, 7), 7, 1)])
def test_nat_block_matches_natten(grid, kernel, dilation, layout):
    block = MaskedBlock(
        16, 2, neighborhood(kernel, dilation=dilation, rpb=True), grid=grid, layout=layout, named_mlp=True
    ).eval()
    attn = block.attn
    assert attn.rpb.shape == (2, 2 * kernel - 1, 2 * kernel - 1) and attn.table.layout == layout
    torch.nn.init.normal_(attn.rpb)  # large enough to move the softmax
    x = torch.randn(2, grid[0] * grid[1], 16)
    q, k, v = attn.qkv(x).reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want = attn.proj(natten_attention(q, k, v, attn.rpb, grid, kernel, dilation).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def swin_block_reference(block, x, grid, w, shift):
    """SwinTransformerBlock.forward written out: roll, partition, window attention with the bias table and
    attn_mask, merge, roll back, MLP."""
    (H, W), (B, N, C), heads = grid, x.shape, block.attn.heads
    attn = block.attn
    h = block.norm1(x).view(B, H, W, C).roll((-shift, -shift), (1, 2))
    windows = h.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
    q, k, v = attn.qkv(windows).reshape(-1, w * w, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[swin_relative_position_index(w).flatten()].view(w * w, w * w, -1)
    scores = scores + bias.permute(2, 0, 1)
    if shift:
        n_windows = (H // w) * (W // w)
        scores = scores.view(B, n_windows, heads, w * w, w * w) + swin_attn_mask(H, w, shift)[None, :, None]
        scores = scores.view(-1, heads, w * w, w * w)
    out = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, w * w, C))
    out = out.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    x = x + out.roll((shift, shift), (1, 2)).reshape(B, N, C)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("layout", ["dense", "blocked"])
@pytest.mark.parametrize("shift", [0, 3])
def test_swin_block_matches_swin(shift, layout):
    grid = (14, 14)
    block = SwinBlock(32, 2, grid, window(7, shift=shift, rpb=True), 7, shift, 4.0).eval()
    block.attn.table.use_layout(layout)
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    assert torch.equal(block.attn.relative_position_index, swin_relative_position_index(7))
    if shift:
        assert torch.equal(block.attn_mask, swin_attn_mask(14, 7, shift))
    x = torch.randn(2, 14 * 14, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), swin_block_reference(block, x, grid, 7, shift), atol=1e-5, rtol=1e-5)


def test_patch_merging_concatenates_in_the_references_order():
    merge = PatchMerging((4, 6), 3)
    x = torch.randn(2, 4, 6, 3)
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    want = merge.reduction(merge.norm(torch.cat(parts, -1).reshape(2, 6, 12)))
    torch.testing.assert_close(merge(x.reshape(2, 24, 3)), want)


def test_stage_four_window_is_shrunk_and_not_shifted(zoo):
    layers = zoo("swin-t").module.layers
    assert [b.attn.mask.name for b in layers[0].blocks] == ["window_7_rpb", "window_7_shift3_rpb"]
    assert [b.attn.mask.name for b in layers[3].blocks] == ["window_7_rpb"] * 2
    assert layers[3].blocks[1].attn_mask is None
    small = models.build("swin-tiny-block", grid=[6, 6], window_size=7).module  # window 7 > map 6: shrunk to 6
    assert [b.attn.mask.name for b in small.blocks] == ["window_6", "window_6"]


def test_dinat_mini_uses_the_references_dilations(zoo):
    names = [[b.attn.mask.name for b in level.blocks] for level in zoo("dinat-mini").module.levels]
    assert names == [
        ["neighborhood_k7_rpb", "neighborhood_k7_d8_rpb", "neighborhood_k7_rpb"],
        ["neighborhood_k7_rpb", "neighborhood_k7_d4_rpb"] * 2,
        ["neighborhood_k7_rpb", "neighborhood_k7_d2_rpb"] * 3,
        ["neighborhood_k7_rpb"] * 5,
    ]


def test_auto_layout_is_blocked_where_the_mask_is_sparse(zoo):
    def layouts(module):
        return [m.layout for m in module.modules() if isinstance(m, MaskTable)]

    assert layouts(zoo("nat-mini").module) == ["blocked"] * 7 + ["dense"] * 11  # 56x56, 28x28 | 14x14, 7x7
    assert layouts(zoo("swin-t").module) == ["blocked"] * 10 + ["dense"] * 2  # one window covers 7x7


# ----------------------------------------------------------------------------- learned bias through export
def _ancestors(model, name):
    """Op types and initializers the value ``name`` is computed from."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    ops, found, todo = set(), {}, [name]
    while todo:
        value = todo.pop()
        if value in inits:
            found[value] = onnx.numpy_helper.to_array(inits[value])
        elif value in producers:
            ops.add(producers[value].op_type)
            todo.extend(i for i in producers[value].input if i)
    return ops, found


# grids large enough that the exporter keeps the Gather: onnxscript's optimizer folds constant subgraphs whose
# inputs have at most 8192 elements into one constant, which is just as exact (test below)
@pytest.mark.parametrize("lowering", ["blocked", "dense"])
@pytest.mark.parametrize(
    "mask, grid",
    [(neighborhood(5, dilation=2, rpb=True), (28, 28)), (window(8, shift=4, rpb=True), (16, 16))],
    ids=["nat", "swin"],
)
def test_rpb_exports_as_a_gather_on_the_weight_and_matches_torch(tmp_path, mask, grid, lowering):
    layer = MaskedSelfAttention(32, 2, mask, grid=grid).eval()
    torch.nn.init.normal_(layer.rpb)
    x = torch.randn(2, layer.seq_len, 32)
    result = export_onnx(
        layer, [x], tmp_path / "m.onnx", lowering=lowering, input_names=["x"], output_names=["y"], custom_op=True
    )
    assert [m["lowering"] for m in result.masks] == [lowering]
    model = onnx.load(result.path)
    [node] = [n for n in model.graph.node if n.domain == "edgeattn"]
    ops, sources = _ancestors(model, node.input[-1])  # the bias input is computed from the weight
    table = tables.build(mask, grid=grid, layout="dense" if lowering == "dense" else "blocked")
    index = table.bias_index if lowering == "dense" else table.bank_bias_index
    assert "Gather" in ops
    assert any(
        a.shape == (2, math.prod(layer.rpb.shape[1:])) and (a == layer.rpb.detach().flatten(1).numpy()).all()
        for a in sources.values()
    )
    assert any(a.dtype.name == "int32" and a.size == index.numel() for a in sources.values())
    results = parity.compare_model(layer, [x], result.path, CPU_RUNTIMES, runs=1)
    for r in results:
        assert r.ok and r.max_abs_err <= 1e-5, parity.format_table(results)


def test_small_rpb_tables_are_folded_by_the_exporter_and_still_exact(tmp_path):
    layer = MaskedSelfAttention(32, 2, window(4, shift=2, rpb=True), grid=(8, 8)).eval()
    torch.nn.init.normal_(layer.rpb)
    x = torch.randn(2, 64, 32)
    result = export_onnx(
        layer, [x], tmp_path / "m.onnx", lowering="blocked", input_names=["x"], output_names=["y"], custom_op=True
    )
    model = onnx.load(result.path)
    [node] = [n for n in model.graph.node if n.domain == "edgeattn"]
    _, sources = _ancestors(model, node.input[-1])
    assert list(sources) == [node.input[-1]]  # one constant: the gathered (P, heads, tq, K) bias
    results = parity.compare_model(layer, [x], result.path, CPU_RUNTIMES, runs=1)
    for r in results:
        assert r.ok and r.max_abs_err <= 1e-5, parity.format_table(results)


@pytest.mark.parametrize("lowering, opset, targets", [("attention", 23, CPU_RUNTIMES), ("contrib", 18, ["ort-cpu"])])
def test_rpb_runs_with_the_other_dense_table_lowerings(tmp_path, lowering, opset, targets):
    layer = MaskedSelfAttention(32, 2, neighborhood(5, dilation=2, rpb=True), grid=(12, 12)).eval()
    torch.nn.init.normal_(layer.rpb)
    x = torch.randn(2, 144, 32)
    path = export_onnx(
        layer,
        [x],
        tmp_path / "m.onnx",
        lowering=lowering,
        opset=opset,
        runtimes=targets,
        input_names=["x"],
        output_names=["y"],
    ).path
    results = parity.compare_model(layer, [x], path, targets, runs=1)
    for r in results:
        assert r.ok and r.max_abs_err <= 1e-5, parity.format_table(results)


def test_rpb_is_trainable_and_required():
    layer = MaskedSelfAttention(16, 2, neighborhood(3, rpb=True), grid=(6, 6), layout="blocked")
    layer(torch.randn(1, 36, 16)).square().sum().backward()
    assert layer.rpb.grad is not None and layer.rpb.grad.abs().sum() > 0
    q = torch.randn(1, 2, 36, 8)
    with pytest.raises(ValueError, match=r"rpb= with shape \(2, 5, 5\)"):
        layer.table(q, q, q)
    with pytest.raises(ValueError, match="no relative position bias table"):
        MaskedSelfAttention(16, 2, neighborhood(3), grid=(6, 6)).table(q, q, q, rpb=torch.zeros(2, 25))


# ----------------------------------------------------------------------------- the registered models exported
# lowering auto: per layer, blocked where the block table scores at most half of the dense pairs
# (dinat-mini's dilation-2 blocks on 14x14 cover one 7x7 group each: blocked at 25% of the dense scores)
AUTO_LOWERINGS = {
    "nat-mini": ["blocked"] * 7 + ["dense"] * 11,
    "dinat-mini": ["blocked"] * 7 + ["dense", "blocked"] * 3 + ["dense"] * 5,
    "swin-t": ["blocked"] * 10 + ["dense"] * 2,
}


@pytest.mark.parametrize("name", ZOO)
def test_registered_model_exports_and_matches_torch(tmp_path, name):
    result = export_registered(name, tmp_path / "m.onnx")
    assert [m["lowering"] for m in result.masks] == AUTO_LOWERINGS[name]
    results = parity.check_file(result.path, CPU_RUNTIMES, runs=1)
    for r in results:
        assert r.ok and r.max_abs_err <= 1e-4, parity.format_table(results)
