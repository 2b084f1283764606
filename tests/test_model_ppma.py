"""ppma-t: the official checkpoint's keys load strictly, the decays and both attention forms follow the reference's
formulas (checked against naive path sums: reference/attention.py), and the exported file matches PyTorch on
onnxruntime and OpenVINO with its masks computed in the graph, not stored."""

import json
import math
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgeattn import models, onnxfile, parity
from edgeattn.models.ppma import PathDecays, PathPosition, PolylineAttention
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES
from reference.attention import ppma_attention

DIMS, DEPTHS, HEADS, MLP, PROJECTION, CLASSES = (64, 128, 256, 512), (2, 2, 8, 2), (4, 4, 8, 16), 3, 1024, 1000
# the `edgeattn` command: its console script when installed, else the same entry point through the module
EDGEATTN = [shutil.which("edgeattn")] if shutil.which("edgeattn") else [sys.executable, "-m", "edgeattn"]


def reference_state_dict_shapes():
    """Key -> shape of the official PPMA-T checkpoint, from the module tree of the reference's PPMAViT
    (classification/models/PPMA.py): patch_embed.proj = Sequential(conv, BN, GELU, conv, BN, GELU, conv, BN, GELU,
    conv, BN); layers[i] = BasicLayer(Relpos = RotaryPositionEmbedding2D (buffer ``angle``), blocks[j] =
    BasicBlock(retention_layer_norm, retention = MambaAttention*Double(q/k/v/out_proj, lepe.conv,
    path_embed = PathEmbeding2D(dt_linear without bias, dt_bias, A_log)), final_layer_norm, ffn(fc1, fc2,
    dwconv.conv), pos.conv), downsample = PatchMerging(reduction conv, norm BN)); proj, norm (BN), head."""
    shapes = {}

    def add(prefix, **tensors):
        shapes.update({f"{prefix}.{name}": tuple(shape) for name, shape in tensors.items()})

    def batchnorm(prefix, c):
        add(prefix, weight=(c,), bias=(c,), running_mean=(c,), running_var=(c,), num_batches_tracked=())

    half = DIMS[0] // 2
    for i, (cin, cout) in zip((0, 3, 6, 9), ((3, half), (half, half), (half, DIMS[0]), (DIMS[0], DIMS[0]))):
        add(f"patch_embed.proj.{i}", weight=(cout, cin, 3, 3), bias=(cout,))
        batchnorm(f"patch_embed.proj.{i + 1}", cout)
    for i, (dim, depth, heads) in enumerate(zip(DIMS, DEPTHS, HEADS)):
        add(f"layers.{i}.Relpos", angle=(dim // heads,))
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}"
            for norm in ("retention_layer_norm", "final_layer_norm"):
                add(f"{block}.{norm}", weight=(dim,), bias=(dim,))
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                add(f"{block}.retention.{proj}", weight=(dim, dim), bias=(dim,))
            add(f"{block}.retention.lepe.conv", weight=(dim, 1, 5, 5), bias=(dim,))
            add(f"{block}.retention.path_embed", dt_bias=(heads,), A_log=(heads,))
            add(f"{block}.retention.path_embed.dt_linear", weight=(2, dim // heads))
            add(f"{block}.ffn.fc1", weight=(MLP * dim, dim), bias=(MLP * dim,))
            add(f"{block}.ffn.fc2", weight=(dim, MLP * dim), bias=(dim,))
            add(f"{block}.ffn.dwconv.conv", weight=(MLP * dim, 1, 3, 3), bias=(MLP * dim,))
            add(f"{block}.pos.conv", weight=(dim, 1, 3, 3), bias=(dim,))
        if i + 1 < len(DIMS):
            add(f"layers.{i}.downsample.reduction", weight=(DIMS[i + 1], dim, 3, 3), bias=(DIMS[i + 1],))
            batchnorm(f"layers.{i}.downsample.norm", DIMS[i + 1])
    add("proj", weight=(PROJECTION, DIMS[-1]), bias=(PROJECTION,))
    batchnorm("norm", PROJECTION)
    add("head", weight=(CLASSES, PROJECTION), bias=(CLASSES,))
    return shapes


@pytest.fixture(scope="module")
def ppma():
    return models.build("ppma-t").module


def test_official_checkpoint_keys_load_strictly():
    ppma = models.build("ppma-t").module  # its own copy: the checkpoint overwrites the weights
    expected = reference_state_dict_shapes()
    assert {k: tuple(v.shape) for k, v in ppma.state_dict().items()} == expected
    g = torch.Generator().manual_seed(0)
    checkpoint = {
        k: torch.randn(shape, generator=g) if not k.endswith("num_batches_tracked") else torch.tensor(7)
        for k, shape in expected.items()
    }
    result = ppma.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = ppma.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint.items())


def test_theta_shift_angles_are_the_reference_values(ppma):
    for layer, dim, heads in zip(ppma.layers, DIMS, HEADS):
        half = dim // heads // 2
        expected = [10000 ** -(i / (half - 1)) for i in range(half) for _ in range(2)]
        torch.testing.assert_close(layer.Relpos.angle, torch.tensor(expected), rtol=1e-6, atol=0)


def test_stages_use_chunk_then_full_attention(ppma):
    modes = [[blk.retention.chunk for blk in layer.blocks] for layer in ppma.layers]
    assert modes == [[True] * 2, [True] * 2, [False] * 8, [False] * 2]


def test_decays_are_softplus_of_the_per_head_linear_times_minus_exp_a_log():
    decays = PathDecays(24, 3)
    with torch.no_grad():
        decays.dt_bias.normal_()
        decays.A_log.normal_()
    x = torch.randn(2, 3, 4, 24)
    row, col = decays(x)
    assert row.shape == col.shape == (2, 3, 3, 4)
    W = decays.dt_linear.weight  # (2, head_dim), shared by the heads
    for h in range(3):
        dt = x[..., 8 * h : 8 * (h + 1)] @ W.T  # this head's channels
        scale = -math.exp(decays.A_log[h].item())
        torch.testing.assert_close(row[:, h], F.softplus(dt[..., 0] + decays.dt_bias[h]) * scale)
        torch.testing.assert_close(col[:, h], F.softplus(dt[..., 1] + decays.dt_bias[h]) * scale)
        assert (row[:, h] < 0).all() and (col[:, h] < 0).all()


@pytest.mark.parametrize("chunk", [True, False], ids=["chunk", "full"])
def test_attention_forms_match_the_reference_formulas_with_naive_masks(chunk):
    attn = PolylineAttention(16, 2, chunk).eval()
    B, n, H, W, d = 2, 2, 3, 4, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, H, W, d, generator=g, dtype=torch.float64) for _ in range(3))
    row_decay, col_decay = (-2 * torch.rand(B, n, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    out = attn.attend(q, k, v, PathPosition(None, None, row_decay, col_decay))  # (B, H, W, n*d)
    assert out.shape == (B, H, W, n * d)
    for b in range(B):
        for h in range(n):
            expected = ppma_attention(q[b, h], k[b, h], v[b, h], row_decay[b, h], col_decay[b, h], chunk)
            torch.testing.assert_close(out[b, :, :, h * d : (h + 1) * d], expected, rtol=1e-10, atol=1e-12)


def test_decays_depend_on_the_input(ppma):
    block = ppma.layers[2].blocks[0].retention
    x = torch.randn(1, 14, 14, 256)
    assert not torch.allclose(block.path_embed(x)[0], block.path_embed(2 * x)[0])


def test_bad_inputs_are_clear_errors(ppma):
    with pytest.raises(ValueError, match=r"takes \(batch, 3, height, width\) images"):
        ppma(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="one per stage"):
        models.build("ppma-t", depths=[2, 2, 2])
    with pytest.raises(ValueError, match="even width"):
        PolylineAttention(12, 4, chunk=False)


def _assert_masks_computed_in_the_graph(path, token_counts, param_bytes):
    """Every attention is an edgeattn node fed a bias computed in the graph; no (N x N) constant is stored.
    Returns the file's per-node mask metadata."""
    model = onnx.load(str(path))
    masks = onnxfile.read_metadata(model)["masks"]
    nodes = [n for n in model.graph.node if n.domain == onnxfile.DOMAIN]
    assert len(nodes) == len(masks) and all("computed in the graph" in m["why"] for m in masks)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in nodes:  # q, k, v, the all-true (1, 1, 1, 1) mask, then the bias: an output of another node
        assert inits[node.input[3]].shape == (1, 1, 1, 1) and node.input[4] not in inits
    for name, array in inits.items():
        assert not any(array.shape[-2:] == (n, n) for n in token_counts), (name, array.shape)
    extra = sum(a.nbytes for a in inits.values()) - param_bytes
    assert extra < 500_000, f"{extra} bytes stored beyond the weights"  # a 56x56-token dense fp32 mask: 39 MB
    return masks


def test_reduced_ppma_exports_and_matches_on_onnx_runtimes(tmp_path):
    # both attention forms at a small size: 48x48 image -> 12x12 / 6x6 chunk stages, 3x3 / 2x2 full stages
    config = dict(image_size=48, depths=[1, 1, 1, 1])
    result = export_registered("ppma-t", tmp_path / "m.onnx", custom_op=True, **config)
    # per chunk block col(row(v)) then row(col(v)); per full block the mask M then its transpose
    chunk, full = (
        ["polyline_rows", "polyline_columns", "polyline_columns", "polyline_rows"],
        ["polyline_row", "polyline_column"],
    )
    assert [m["mask"] for m in result.masks] == chunk * 2 + full * 2
    module = models.build("ppma-t", **config).module
    params = sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point())
    _assert_masks_computed_in_the_graph(result.path, (144, 36, 9, 4), params)
    results = parity.check_file(result.path, CPU_RUNTIMES, runs=1)
    for r in results:
        assert r.ok and r.max_abs_err <= 1e-4, parity.format_table(results)


def test_cli_exports_and_checks_the_registered_ppma_t(tmp_path, ppma):
    path, report = tmp_path / "ppma-t.onnx", tmp_path / "parity.json"
    run = subprocess.run(
        [
            *EDGEATTN,
            "export",
            "ppma-t",
            "-o",
            str(path),
            "--custom-op",
            "--check",
            "--runs",
            "1",
            "--runtime",
            "ort-cpu",
            "--runtime",
            "openvino-cpu",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(report.read_text())
    assert {r["runtime"] for r in rows} == set(CPU_RUNTIMES)
    assert all(r["ok"] and r["max_abs_err"] <= 1e-4 for r in rows), rows
    params = sum(t.numel() * 4 for t in ppma.state_dict().values() if t.is_floating_point())
    # the weights plus the exporter's per-node metadata (~2 MB): one stage-1 dense fp32 mask would add 39 MB
    assert path.stat().st_size < 1.05 * params
    masks = _assert_masks_computed_in_the_graph(path, (3136, 784, 196, 49), params)
    assert len(masks) == 4 * (2 + 2) + 2 * (8 + 2)  # 4 per chunk block (stages 1-2), 2 per full block
