"""mask2former-decoder: export parity, masks computed from the inputs, the reference's empty-mask rule, and
loading a Mask2Former checkpoint's decoder keys."""

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeattn import decisions, export_onnx, models, onnxfile, parity, runtimes
from edgeattn.errors import EdgeAttnError
from edgeattn.onnxfile import formats
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES

NAME = "mask2former-decoder"
# A small variant for the tests that export more than once or run in float64: 4, 8 and 16 px maps, 32 px mask
# features, 12 queries, 4 layers (round-robin wraps), and feature maps narrower than the hidden width so the
# 1x1 input projections are exercised.
SMALL = dict(
    image_size=128,
    in_channels=48,
    hidden_dim=64,
    heads=4,
    dim_feedforward=96,
    num_queries=12,
    dec_layers=4,
    mask_dim=32,
    num_classes=7,
)
# A mask is sigmoid(logit) < 0.5: a logit within float rounding of 0 may land on either side on another runtime
# (as it does between float32 and float64 torch), which moves that query's output by ~1e-3.  The small model's
# mask logits differ between the runtimes and torch by at most ~2e-6 (its pred_masks max_abs_err), so inputs
# whose interpolated mask logits all stay this far from 0 give the same masks everywhere and must match closely.
MARGIN = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The registered model exported and checked by the command line, as a user runs it (one full-size export
    for the whole file: it is the slow step)."""
    folder = tmp_path_factory.mktemp("m2f")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeattn",
            "export",
            NAME,
            "-o",
            str(folder / "m.onnx"),
            "--check",
            "--runs",
            "1",
            "--json",
            str(folder / "check.json"),
        ],
        capture_output=True,
        text=True,
    )
    return folder, proc


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("m2f_small") / "small.onnx"
    export_registered(NAME, path, **SMALL)
    return path, models.build(NAME, **SMALL)


def assert_parity(results):
    assert [r.runtime for r in results] == CPU_RUNTIMES
    assert all(r.ok and r.max_abs_err <= 1e-4 for r in results), parity.format_table(results)


def test_cli_export_check_exits_0_with_parity_on_ort_and_openvino(exported):
    folder, proc = exported
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["runtime"]: r for r in json.loads((folder / "check.json").read_text())}
    assert set(rows) == {"torch", *CPU_RUNTIMES}
    assert all(rows[r]["ok"] and rows[r]["max_abs_err"] <= 1e-4 for r in CPU_RUNTIMES), proc.stdout
    # the masks have no name (they are computed from the inputs): the export summary and the file's description say so
    said = proc.stdout + proc.stderr
    assert "9 attention nodes (<computed in the graph> (dense) x9)" in said, said
    assert "  <computed in the graph> x9: dense" in said, said


def test_masks_computed_in_the_graph_are_labelled_so(small):
    from edgeattn.export.exporter import ExportResult
    from edgeattn.registered import _summary

    path, _ = small
    meta = onnxfile.read_metadata(onnx.load(str(path), load_external_data=False))
    assert {m["mask"] for m in meta["masks"]} == {""} and {m["table_bytes"] for m in meta["masks"]} == {0}
    assert "\n  <computed in the graph> x4: dense (mask computed in the graph)" in parity.describe(path, meta)
    result = ExportResult(path, meta["opset"], False, "auto", [], masks=meta["masks"])
    assert "4 attention nodes (<computed in the graph> (dense) x4)" in _summary(result)
    # a mask stored in the file without a name is not said to be computed
    assert onnxfile.mask_label({"mask": "", "table_bytes": 64}) == "<unnamed>"


def test_every_layer_attends_over_a_mask_computed_in_the_graph(exported):
    meta = onnxfile.read_metadata(onnx.load(str(exported[0] / "m.onnx"), load_external_data=False))
    assert meta["model"] == NAME and meta["table_bytes"] == 0  # no mask table is stored in the file
    assert len(meta["masks"]) == 9
    assert all(m["lowering"] == "dense" and "computed in the graph" in m["why"] for m in meta["masks"])


def test_every_mask_threshold_is_a_declared_decision_written_as_standard_ops(exported):
    model = onnx.load(str(exported[0] / "m.onnx"), load_external_data=False)
    declared = onnxfile.read_metadata(model)["decisions"]
    assert len(declared) == 9 and all(d["threshold"] == 0.5 for d in declared)
    compared = {n.input[0] for n in model.graph.node if n.op_type == "Less"}
    assert {d["tensor"] for d in declared} <= compared
    assert not [n for n in model.graph.node if n.domain]  # no edgeattn node is left


# 2x2, 4x4 and 8x8 maps and 16x16 mask features, one layer per map (OpenVINO drops an input no layer reads): layer
# 0 attends the 2x2 map, whose key (0, 0) is the bilinear resize of mask pixels (3..4, 3..4) alone.
TIE = dict(
    image_size=64,
    in_channels=16,
    hidden_dim=16,
    heads=2,
    dim_feedforward=32,
    num_queries=4,
    dec_layers=3,
    mask_dim=8,
    num_classes=3,
)


def test_a_mask_decision_tied_at_the_threshold_is_explained_and_passes(tmp_path):
    """A tie built on purpose, the same on every CPU.  Mask feature channel 0 is 1 on pixels (3..4, 3..4), which
    are 0 in every other channel, and 0 elsewhere; the mask embedding's channel 0 is exactly 0 (its weights and bias
    zeroed).  So every query's mask logit for layer 0's key (0, 0) is exactly 0: sigmoid 0.5, not below the
    threshold, attended.  The file comes from a copy whose channel-0 bias is -1e-5 (what a runtime's rounding
    could do): there the value is 0.5 - 2.5e-6, below, and every query masks that key.  Without the runtime's
    decisions the outputs differ far beyond 1e-4; with them (a tie: within decision_eps of 0.5) they match, and the
    row says how many flipped."""
    built = models.build(NAME, **TIE)
    *levels, features = (t.clone() for t in built.inputs.values())
    features[:, 0] = 0
    features[:, :, 3:5, 3:5] = 0
    features[:, 0, 3:5, 3:5] = 1
    inputs = [*levels, features]
    with torch.no_grad():
        head = built.module.mask_embed.layers[-1]
        head.weight[0], head.bias[0] = 0, 0
        shifted = copy.deepcopy(built.module)
        shifted.mask_embed.layers[-1].bias[0] = -1e-5
    path = tmp_path / "tie.onnx"
    export_onnx(shifted, inputs, path, input_names=list(built.inputs), output_names=list(built.outputs))
    results = parity.compare_model(built.module, inputs, path, CPU_RUNTIMES, runs=1)
    assert_parity(results)
    for r in results:
        flipped, total = (int(x) for x in re.match(r"(\d+) of (\d+) decisions flipped", r.detail).groups())
        margin = float(re.search(r"largest margin ([0-9.e+-]+)", r.detail).group(1))
        raw = float(re.search(r"without: ([0-9.e+-]+)", r.detail).group(1))
        # key (0, 0) of layer 0 for each query, of the 2x2, 4x4 and 8x8 maps' decisions
        assert flipped == TIE["num_queries"] and total == TIE["num_queries"] * (4 + 16 + 64), r.detail
        assert 2e-6 < margin < 3e-6, r.detail
        assert raw > 1e-4 >= r.max_abs_err  # the tie alone fails the plain gate


def test_a_decision_flipped_at_a_large_margin_is_not_a_tie(small):
    """The runtime's own mask values, one pushed far across 0.5: the re-run counts it as a real difference."""
    path, built = small
    inputs = list(built.inputs.values())
    declared = onnxfile.read_metadata(onnx.load(str(path)))["decisions"]
    session = runtimes.get("ort-cpu").load(path, observe=[d["tensor"] for d in declared])
    header = formats.header(path)
    out = session.run({i.name: t.numpy() for i, t in zip(header.inputs, inputs)})
    values = [out[d["tensor"]].copy() for d in declared]
    far = np.abs(values[1] - 0.5).argmax()
    values[1].flat[far] = 1.0 - values[1].flat[far]
    ledger = decisions.Ledger(values, eps=1e-4)
    with ledger, torch.no_grad():
        built.module(*inputs)
    assert ledger.large == 1 and ledger.largest_flip > 0.1 and ledger.ties == 0
    assert ledger.total == sum(v.size for v in values)
    with pytest.raises(EdgeAttnError, match="more decisions than the file declares"):
        with decisions.Ledger(values[:3], eps=1e-4), torch.no_grad():
            built.module(*inputs)


def sine_embedding(h, w, channels, dtype):
    """DETR's normalized sine encoding, written out channel by channel: (h * w, 2 * channels)."""

    def axis(n):
        pos = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1e-6) * 2 * math.pi
        cols = [
            (torch.sin if c % 2 == 0 else torch.cos)(pos / 10000 ** (2 * (c // 2) / channels)) for c in range(channels)
        ]
        return torch.stack(cols, dim=1)

    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat((axis(h)[ys.flatten()], axis(w)[xs.flatten()]), dim=1).to(dtype)


def reference_decoder(model, inputs, attend_everywhere=True):
    """The reference decoder (sequence-first, torch's own nn.MultiheadAttention, bool masks True = masked,
    repeated per head) run with ``model``'s weights.  Returns the final (class, mask) logits, every layer's
    masks before the empty-row rule and the smallest |interpolated mask logit| seen."""
    *levels, mask_features = inputs
    dtype, batch = mask_features.dtype, mask_features.shape[0]
    dim, heads = model.query_feat.weight.shape[1], model.heads

    def attention(layer):
        mha = nn.MultiheadAttention(dim, heads).to(dtype).eval()
        mha.load_state_dict(layer.state_dict())
        return mha

    src, pos, sizes = [], [], []
    for i, x in enumerate(levels):
        sizes.append(x.shape[-2:])
        src.append((model.input_proj[i](x).flatten(2) + model.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        pos.append(sine_embedding(*x.shape[-2:], dim // 2, dtype)[:, None, :])
    query_pos = model.query_embed.weight[:, None].repeat(1, batch, 1)
    out = model.query_feat.weight[:, None].repeat(1, batch, 1)

    def heads_on(out):
        decoded = model.decoder_norm(out).transpose(0, 1)
        return model.class_embed(decoded), torch.einsum("bqc,bchw->bqhw", model.mask_embed(decoded), mask_features)

    raw, margin = [], math.inf
    cls, masks = heads_on(out)
    for i, (cross, selfa, ffn) in enumerate(
        zip(
            model.transformer_cross_attention_layers,
            model.transformer_self_attention_layers,
            model.transformer_ffn_layers,
        )
    ):
        level = i % 3
        resized = F.interpolate(masks, size=sizes[level], mode="bilinear", align_corners=False).flatten(2)
        margin = min(margin, resized.abs().min().item())
        blocked = resized.sigmoid() < 0.5  # (B, Q, HW)
        raw.append(blocked)
        blocked = blocked[:, None].repeat(1, heads, 1, 1).flatten(0, 1)  # (B * heads, Q, HW)
        if attend_everywhere:
            blocked = blocked & ~blocked.all(-1, keepdim=True)
        attended = attention(cross.multihead_attn)(
            out + query_pos, src[level] + pos[level], src[level], attn_mask=blocked, need_weights=False
        )[0]
        out = cross.norm(out + attended)
        q = out + query_pos
        out = selfa.norm(out + attention(selfa.self_attn)(q, q, out, need_weights=False)[0])
        out = ffn.norm(out + ffn.linear2(F.relu(ffn.linear1(out))))
        cls, masks = heads_on(out)
    return cls, masks, raw, margin


def test_masks_are_computed_from_the_inputs(small):
    path, built = small
    first = list(built.inputs.values())
    generator = torch.Generator().manual_seed(2)  # seed 0 drew the first inputs
    second = [torch.randn(t.shape, generator=generator) for t in first]
    with torch.no_grad():
        (*_, masks_a, margin_a), (*_, masks_b, margin_b) = (reference_decoder(built.module, x) for x in (first, second))
    assert margin_a > MARGIN and margin_b > MARGIN, (margin_a, margin_b)
    for a, b in zip(masks_a, masks_b):
        assert 0.2 < a.float().mean() < 0.8 and not torch.equal(a, b)  # real, input-dependent masks
    # the file was exported with the first inputs (check_file rebuilds them from its metadata); both must match
    assert_parity(parity.check_file(path, CPU_RUNTIMES, runs=1))
    assert_parity(parity.compare_model(built.module, second, path, CPU_RUNTIMES, runs=1))


def empty_row_inputs(model, like, batch, generator):
    """Inputs shaped as ``like`` whose mask features make query 0's first mask exclude every position."""
    *levels, mask_features = [torch.randn(batch, *t.shape[1:], generator=generator) for t in like]
    with torch.no_grad():
        embed = model.mask_embed(model.decoder_norm(model.query_feat.weight))[0]  # query 0 before layer 0
    away = (-embed / embed.norm()).to(mask_features.dtype)
    return [*levels, 0.3 * mask_features + 5 * away[None, :, None, None]]


def test_a_query_masked_everywhere_attends_everywhere(small):
    path, built = small
    model64 = models.build(NAME, **SMALL).module.double()
    inputs = empty_row_inputs(model64, built.inputs.values(), 2, torch.Generator().manual_seed(5))
    inputs64 = [t.double() for t in inputs]
    with torch.no_grad():
        cls, masks, raw, _ = reference_decoder(model64, inputs64)
        assert raw[0][:, 0].all()  # query 0 is masked everywhere in layer 0
        got_cls, got_masks = model64(*inputs64)
        # float64 throughout except the positional encoding, which the reference computes in float32 (1e-7)
        torch.testing.assert_close(got_cls, cls, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_masks, masks, rtol=0, atol=1e-6)
        # without the rule the reference differs (the row has no key to attend), so the check above can fail
        without = reference_decoder(model64, inputs64, attend_everywhere=False)[1]
        assert not torch.allclose(without, masks, atol=1e-3, equal_nan=False)
    # the exported file applies the same rule
    single = [t[:1] for t in inputs]
    assert reference_decoder(built.module, single)[3] > MARGIN
    assert_parity(parity.compare_model(built.module, single, path, CPU_RUNTIMES, runs=1))


def reference_decoder_keys(layers, projections, hidden, ffn, queries, classes, mask_dim, in_channels):
    """The decoder's keys in a Mask2Former checkpoint (``sem_seg_head.predictor.`` prefix removed) and shapes."""
    keys = {}
    for i in range(layers):
        for block, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            keys.update(
                {
                    f"{block}.{i}.{attn}.in_proj_weight": (3 * hidden, hidden),
                    f"{block}.{i}.{attn}.in_proj_bias": (3 * hidden,),
                    f"{block}.{i}.{attn}.out_proj.weight": (hidden, hidden),
                    f"{block}.{i}.{attn}.out_proj.bias": (hidden,),
                    f"{block}.{i}.norm.weight": (hidden,),
                    f"{block}.{i}.norm.bias": (hidden,),
                }
            )
        keys.update(
            {
                f"transformer_ffn_layers.{i}.linear1.weight": (ffn, hidden),
                f"transformer_ffn_layers.{i}.linear1.bias": (ffn,),
                f"transformer_ffn_layers.{i}.linear2.weight": (hidden, ffn),
                f"transformer_ffn_layers.{i}.linear2.bias": (hidden,),
                f"transformer_ffn_layers.{i}.norm.weight": (hidden,),
                f"transformer_ffn_layers.{i}.norm.bias": (hidden,),
            }
        )
    keys.update(
        {
            "decoder_norm.weight": (hidden,),
            "decoder_norm.bias": (hidden,),
            "query_feat.weight": (queries, hidden),
            "query_embed.weight": (queries, hidden),
            "level_embed.weight": (3, hidden),
            "class_embed.weight": (classes + 1, hidden),
            "class_embed.bias": (classes + 1,),
        }
    )
    for j, (n_in, n_out) in enumerate(((hidden, hidden), (hidden, hidden), (hidden, mask_dim))):
        keys.update({f"mask_embed.layers.{j}.weight": (n_out, n_in), f"mask_embed.layers.{j}.bias": (n_out,)})
    if projections:  # a 1x1 Conv2d per level when the maps are not already hidden wide
        for j in range(3):
            keys.update({f"input_proj.{j}.weight": (hidden, in_channels, 1, 1), f"input_proj.{j}.bias": (hidden,)})
    return keys


@pytest.mark.parametrize("config,projections", [({}, False), (SMALL, True)])
def test_checkpoint_decoder_keys_load_strictly(config, projections):
    spec = {**models.REGISTRY[NAME].config, **config}
    keys = reference_decoder_keys(
        spec["dec_layers"],
        projections,
        spec["hidden_dim"],
        spec["dim_feedforward"],
        spec["num_queries"],
        spec["num_classes"],
        spec["mask_dim"],
        spec["in_channels"],
    )
    model = models.build(NAME, **config).module
    generator = torch.Generator().manual_seed(1)
    checkpoint = {k: torch.randn(shape, generator=generator) for k, shape in keys.items()}
    model.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.items())


def test_bad_inputs_are_clear_errors():
    model = models.build(NAME, **SMALL).module
    *levels, mask_features = models.build(NAME, **SMALL).inputs.values()
    with pytest.raises(ValueError, match="feature maps need 48 channels"):
        model(levels[0][:, :8], *levels[1:], mask_features)
    with pytest.raises(ValueError, match="one batch size"):
        model(*levels, mask_features.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="hidden_dim must be even and a multiple of heads"):
        models.build(NAME, hidden_dim=100, heads=8)
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        models.build(NAME, image_size=500)
