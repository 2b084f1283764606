"""openvino-cpu converts dense-table attention nodes to OpenVINO's ScaledDotProductAttention op and inlines the rest."""

import numpy as np
import pytest
import torch

from edgeattn import EdgeAttnError, export_onnx, load, masks, parity, tables
from edgeattn.layers import MaskedSelfAttention
from edgeattn.runtimes import openvino as openvino_runtime

from conftest import require


@pytest.fixture(autouse=True)
def _openvino():
    require("openvino-cpu")


def _rows_1_mod_4_masked(q, kv):  # causal, with every query q = 1 (mod 4) allowed no key at all
    return (q % 4 != 1) & (kv <= q)


def _alibi(b, h, q, kv):
    return -(h + 1) * 0.1 * (q - kv).abs()


MASKS = {
    "causal": masks.causal(),
    "empty_rows": masks.custom(lambda b, h, q, kv: _rows_1_mod_4_masked(q, kv), name="empty_rows"),
    "bias": masks.custom(lambda b, h, q, kv: kv <= q, bias_mod=_alibi, name="alibi"),
    "bias_empty_rows": masks.custom(
        lambda b, h, q, kv: _rows_1_mod_4_masked(q, kv), bias_mod=_alibi, name="alibi_empty_rows"
    ),
}
# lowering -> (opset, ScaledDotProductAttention ops expected in the OpenVINO model of a one-layer file)
LOWERINGS = {"dense": (18, 1), "attention": (23, 1), "blocked": (18, 0)}


def _export(tmp_path, layer, x, lowering, opset, custom_op=True):
    path = tmp_path / f"{lowering}.onnx"
    export_onnx(
        layer, [x], path, lowering=lowering, opset=opset, custom_op=custom_op, input_names=["x"], output_names=["y"]
    )
    return path


@pytest.mark.parametrize("lowering", sorted(LOWERINGS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_matches_torch_and_uses_sdpa_for_dense_tables(tmp_path, mask, lowering):
    opset, fused = LOWERINGS[lowering]
    layer = MaskedSelfAttention(16, 2, MASKS[mask], seq_len=12).eval()
    x = torch.randn(2, 12, 16)
    path = _export(tmp_path, layer, x, lowering, opset)
    session = load(path, "openvino-cpu")
    assert session.fused_sdpa == fused
    if mask.endswith("empty_rows"):  # the case really has fully-masked rows
        assert not tables.build(MASKS[mask], q_len=12, heads=2, layout="dense").mask.any(-1).all()
    results = parity.compare_model(layer, [x], path, ["openvino-cpu"], runs=1)
    assert results[0].ok and results[0].max_abs_err <= 1e-5, parity.format_table(results)


def test_fully_masked_rows_are_exact_zeros(tmp_path):
    layer = MaskedSelfAttention(16, 2, MASKS["bias_empty_rows"], seq_len=12, proj=False).eval()
    x = torch.randn(1, 12, 16)
    y = load(_export(tmp_path, layer, x, "dense", 18), "openvino-cpu").run({"x": x.numpy()})["y"]
    assert np.isfinite(y).all() and (y[0, 1::4] == 0).all()


def test_one_file_mixes_sdpa_and_inlined_blocked_bodies(tmp_path):
    model = torch.nn.Sequential(
        MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(12, 12)),  # auto: blocked
        MaskedSelfAttention(16, 2, masks.causal(), seq_len=144),
    ).eval()  # auto: attention
    x = torch.randn(1, 144, 16)
    path = _export(tmp_path, model, x, "auto", 23)
    assert load(path, "openvino-cpu").fused_sdpa == 1
    results = parity.compare_model(model, [x], path, ["openvino-cpu"], runs=1)
    assert results[0].ok and results[0].max_abs_err <= 1e-5, parity.format_table(results)


def test_inlined_files_have_nothing_to_convert(tmp_path):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=12).eval()
    path = _export(tmp_path, layer, torch.randn(1, 12, 16), "dense", 18, custom_op=False)
    assert load(path, "openvino-cpu").fused_sdpa == 0


def test_a_conversion_error_is_one_line(tmp_path, monkeypatch):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=12).eval()
    path = _export(tmp_path, layer, torch.randn(1, 12, 16), "dense", 18)

    def broken(context):
        raise ValueError("unsupported mask")

    monkeypatch.setattr(openvino_runtime, "to_sdpa", broken)
    with pytest.raises(EdgeAttnError) as error:
        load(path, "openvino-cpu")
    assert str(error.value) == (
        f"{path}: OpenVINO could not convert edgeattn attention to ScaledDotProductAttention: unsupported mask"
    )


def test_openvino_errors_show_the_line_that_says_what_failed():
    # what OpenVINO 2026.4's CPU plugin raised on Mask2Former before its bodies avoided the pattern
    raised = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:117:\n"
        "Exception from src/inference/src/dev/plugin.cpp:54:\n"
        "Check 'consumer.get_expr()->get_loop_ids() == loop_ids' failed at "
        "src/common/snippets/src/lowered/pass/move_scalar_to_consumer.cpp:34:\n"
        "All consumers of a Scalar expression are expected to have the same loop IDs\n\n"
    )
    assert openvino_runtime.ov_error(raised) == (
        "All consumers of a Scalar expression are expected to have the same loop IDs"
    )
    assert (
        openvino_runtime.ov_error(RuntimeError("Exception from a.cpp:1:\nCheck 'x' failed at b.cpp:2: x is 0"))
        == "Check 'x' failed at b.cpp:2: x is 0"
    )
