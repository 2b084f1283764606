"""edgeattn.convert on transformers' Swin and Mask2Former (tiny configs, random weights): the converted model's outputs
equal the transformers model's in eager PyTorch, after export on onnxruntime and OpenVINO, and in a process that
never imports edgeattn."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeattn
from edgeattn import parity, runtimes
from edgeattn.convert import hf_vision
from edgeattn.errors import EdgeAttnError

transformers = pytest.importorskip("transformers")

CONSUME = Path(__file__).resolve().parents[1] / "deploy" / "consume.py"
ATOL = 1e-5  # eager, converted vs transformers (abs and rel): the same sums in another order


def tiny_swin(image_size, window_size=4, seed=0):
    """SwinForImageClassification, 2 stages; transformers zero-fills the bias tables: random ones, so they count."""
    torch.manual_seed(seed)
    config = transformers.SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=24,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=window_size,
        num_labels=10,
    )
    model = transformers.SwinForImageClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1.0)
            elif p.dim() == 2:  # larger weights than transformers' init: attention far from uniform
                p.normal_(0, 0.2)
    return model, torch.randn(2, 3, *image_size)


def tiny_mask2former():
    """Mask2FormerModel on a 4-stage tiny Swin backbone (Mask2FormerForUniversalSegmentation adds only the loss and
    a class head, and its loss needs scipy); 3 decoder layers, so the round-robin over 3 levels is complete."""
    torch.manual_seed(0)
    backbone = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        num_queries=8,
        encoder_layers=1,
        decoder_layers=4,
        num_attention_heads=2,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_labels=5,
        use_pretrained_backbone=False,
    )
    return transformers.Mask2FormerModel(config).eval(), torch.randn(1, 3, 64, 64)


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


class Decoder(nn.Module):
    """Mask2Former's transformer module on its 3 feature maps and mask features -> queries, last mask logits."""

    def __init__(self, model):
        super().__init__()
        self.module = model.transformer_module

    def forward(self, features_s32, features_s16, features_s8, mask_features):
        out = self.module([features_s32, features_s16, features_s8], mask_features)
        return out.last_hidden_state, out.masks_queries_logits[-1]


def consume(tmp_path, path, feeds, reference):
    """Run ``path`` with plain onnxruntime and plain OpenVINO in a process that cannot import edgeattn."""
    np.savez(tmp_path / "feeds.npz", **feeds)
    jobs = [{"name": "m", "file": str(path), "feeds": str(tmp_path / "feeds.npz"), "work": str(tmp_path / "w")}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for consumer in ("ort", "openvino"):
        done = subprocess.run(
            [sys.executable, str(CONSUME), consumer, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((tmp_path / "out.json").read_text())["m"]
        assert "outputs" in result, f"{consumer}: {result}"
        outputs = list(np.load(result["outputs"]).values())
        assert len(outputs) == len(reference)
        for got, want in zip(outputs, reference):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=consumer)


def assert_close(outputs, reference, atol=ATOL):
    for got, want in zip(outputs, reference):
        torch.testing.assert_close(got, want, atol=atol, rtol=ATOL)


# ---- Swin ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, kinds",
    [
        ((64, 64), ["window_4_rpb on 16x16", "window_4_shift2_rpb on 16x16", "window_4_shift2_rpb on 8x8"]),
        # 8x14 then 4x7 tokens: padded to window multiples, and the 4x7 stage is no larger than the window on one axis,
        # so transformers resets its shift to 0 (both of its layers unshifted)
        (
            (32, 56),
            [
                "window_4_shift2_rpb on 8x14 tokens, padded to 8x16",
                "layers.1.blocks.1: transformers SwinLayer -> masked attention window_4_rpb on 4x7 tokens, padded",
            ],
        ),
    ],
)
def test_swin_converted_equals_transformers(image_size, kinds):
    model, pixels = tiny_swin(image_size)
    with torch.no_grad():
        want = model(pixels, output_hidden_states=True)
        converted, lines = edgeattn.convert(model, pixels, report=True)
        got = converted(pixels, output_hidden_states=True)
    assert len(lines) == 4 and all(any(kind in line for line in lines) for kind in kinds), lines
    assert all(isinstance(m, hf_vision.SwinGridLayer) for stage in converted.swin.encoder.layers for m in stage.blocks)
    assert converted.state_dict().keys() == model.state_dict().keys()
    assert_close((got.logits, *got.hidden_states), (want.logits, *want.hidden_states))
    # the bias table is still the trainable weight the converted layers read
    with torch.no_grad():
        converted.swin.encoder.layers[0].blocks[1].attention.relative_position_bias.relative_position_bias_table.add_(
            torch.linspace(0, 3, 49)[:, None]
        )
        assert (converted(pixels).logits - want.logits).abs().max() > 1e-3


def test_swin_refuses_what_it_cannot_reproduce():
    model, pixels = tiny_swin((64, 64))
    with pytest.raises(EdgeAttnError, match="example input"):
        edgeattn.convert(model)
    # 3x3 tokens in the last stage, smaller than the window: transformers fails there itself
    small, small_pixels = tiny_swin((24, 24))
    with pytest.raises(EdgeAttnError, match="smaller than its window 4"):
        edgeattn.convert(small, small_pixels)
    converted = edgeattn.convert(model, pixels)
    with pytest.raises(EdgeAttnError, match="converted for a 16x16 grid"):
        converted(torch.randn(1, 3, 32, 32))
    with pytest.raises(EdgeAttnError, match="output_attentions"):
        converted(pixels, output_attentions=True)


class GridLayer(nn.Module):
    """A Swin layer called at one grid, as its stage calls it: hidden states (B, H * W, C) -> (B, H * W, C)."""

    def __init__(self, layer, grid):
        super().__init__()
        self.layer, self.grid = layer, grid

    def forward(self, hidden_states):
        return self.layer(hidden_states, self.grid)[0]


def test_bare_swin_layer_converts_to_its_replacement_and_exports(tmp_path):
    """A SwinLayer given to convert itself (shifted, on a grid padded to the window): the converted layer."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(embed_dim=16, window_size=4, num_heads=[2])
    layer = transformers.models.swin.modeling_swin.SwinLayer(config, 16, (6, 8), num_heads=2, shift_size=2).eval()
    with torch.no_grad():
        layer.attention.relative_position_bias.relative_position_bias_table.normal_(0, 1.0)  # zeros at init
    hidden = torch.randn(2, 48, 16)
    with torch.no_grad():
        want = layer(hidden, (6, 8))[0]
        converted, lines = edgeattn.convert(layer, hidden, (6, 8), report=True)
        got, weights = converted(hidden, (6, 8))
    assert isinstance(converted, hf_vision.SwinGridLayer) and weights is None
    assert lines == [
        "(module): transformers SwinLayer -> masked attention window_4_shift2_rpb on 6x8 tokens, padded to 8x8, "
        "blocked table"
    ]
    assert converted.state_dict().keys() == layer.state_dict().keys()
    assert_close([got], [want])
    path = tmp_path / "layer.onnx"
    edgeattn.export_onnx(GridLayer(converted, (6, 8)), (hidden,), path, input_names=["x"], output_names=["y"])
    (y,) = edgeattn.load(path, runtime="ort-cpu").run({"x": hidden.numpy()}).values()
    np.testing.assert_allclose(y, want.numpy(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def swin_file(tmp_path_factory):
    model, pixels = tiny_swin((64, 64), seed=1)
    path = tmp_path_factory.mktemp("hf_swin") / "swin.onnx"
    converted = edgeattn.convert(model, pixels)
    edgeattn.export_onnx(Logits(converted), (pixels,), path, input_names=["pixel_values"], output_names=["logits"])
    with torch.no_grad():
        return path, pixels, model(pixels).logits


def test_swin_exported_equals_transformers_on_ort_and_openvino(swin_file):
    path, pixels, want = swin_file
    for runtime in ("ort-cpu", "openvino-cpu"):
        (got,) = edgeattn.load(path, runtime=runtime).run({"pixel_values": pixels.numpy()}).values()
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0, err_msg=runtime)


def test_swin_file_runs_without_edgeattn(swin_file, tmp_path):
    path, pixels, want = swin_file
    consume(tmp_path, path, {"pixel_values": pixels.numpy()}, [want.numpy()])


# ---- Mask2Former ---------------------------------------------------------------------------------------------


def test_mask2former_converted_equals_transformers():
    model, pixels = tiny_mask2former()
    with torch.no_grad():
        want = model(pixels)
        converted, lines = edgeattn.convert(model, pixels, report=True)
        got = converted(pixels)
    assert sum("SwinLayer" in line for line in lines) == 4
    assert sum("cross_attn: nn.MultiheadAttention" in line for line in lines) == 3
    assert sum("declared decision" in line for line in lines) == 1
    assert converted.state_dict().keys() == model.state_dict().keys()
    for key in (
        "encoder_last_hidden_state",
        "pixel_decoder_last_hidden_state",
        "transformer_decoder_last_hidden_state",
    ):
        assert_close([got[key]], [want[key]])
    assert_close(got.masks_queries_logits, want.masks_queries_logits)
    # the masks matter: some queries attend only part of the map
    predictor = converted.transformer_module.decoder.mask_predictor
    _, masked = predictor(
        converted.transformer_module.decoder.layernorm(torch.randn(8, 1, 32)), torch.randn(1, 32, 16, 16), (8, 8)
    )
    assert masked.any() and not masked.all()


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    model, _ = tiny_mask2former()
    torch.manual_seed(2)
    # the 3 levels at strides 32, 16, 8 and the stride-4 mask features of a 128x128 image, batch 2
    inputs = [torch.randn(2, 32, s, s) for s in (4, 8, 16, 32)]
    converted = edgeattn.convert(Decoder(model))
    path = tmp_path_factory.mktemp("hf_m2f") / "decoder.onnx"
    edgeattn.export_onnx(
        converted,
        inputs,
        path,
        input_names=["features_s32", "features_s16", "features_s8", "mask_features"],
        output_names=["queries", "masks"],
    )
    with torch.no_grad():
        return path, converted, inputs, [t.numpy() for t in Decoder(model)(*inputs)]


def test_mask2former_decoder_exported_equals_transformers(decoder_file):
    path, converted, inputs, want = decoder_file
    feeds = dict(zip(["features_s32", "features_s16", "features_s8", "mask_features"], (t.numpy() for t in inputs)))
    for runtime in ("ort-cpu", "openvino-cpu"):
        got = list(edgeattn.load(path, runtime=runtime).run(feeds).values())
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=runtime)
    results = parity.compare_model(converted, inputs, path, ["ort-cpu", "openvino-cpu"], runs=1)
    assert all(r.ok for r in results), parity.format_table(results)
    # the thresholds are declared, one per mask a layer uses (the file keeps those only): the tie check can re-run
    # the module with a runtime's decisions
    ort = runtimes.get("ort-cpu")
    _, notes, large = parity.modulo_ties(ort, path, feeds, converted, ort.tolerance(), False, {"max_abs_err": 0.0})
    assert large == 0 and notes[0].startswith("0 of 5376 decisions flipped"), notes  # 2 x 8 queries x (16+64+256)


def test_mask2former_decoder_file_runs_without_edgeattn(decoder_file, tmp_path):
    path, _, inputs, want = decoder_file
    names = ["features_s32", "features_s16", "features_s8", "mask_features"]
    consume(tmp_path, path, dict(zip(names, (t.numpy() for t in inputs))), want)
