"""fp16 / bf16 / int8 files, OpenVINO precision hints, and exports at every opset from 17 to 23."""

import numpy as np
import onnx
import pytest
import torch

from edgeattn import EdgeAttnError, export_onnx, load, masks, onnxfile, parity, runtimes
from edgeattn.cli import main
from edgeattn.inspection import inspect_file
from edgeattn.layers import MaskedSelfAttention
from edgeattn.registered import export_registered
from edgeattn.runtimes.base import REDUCED_PRECISION

from conftest import CPU_RUNTIMES

# every third query attends nothing: reduced precision must still give zeros there, never NaN
HOLES = masks.custom(lambda b, h, q, kv: (q % 3 != 0) & ((kv - q).abs() <= 4), name="holes")


def _runnable(precision):
    return [
        r for r in CPU_RUNTIMES if not runtimes.get(r).not_supported_reasons(onnxfile.Contents(precision), here=False)
    ]


def _layer(seq_len=24):
    return MaskedSelfAttention(32, 2, HOLES, seq_len=seq_len).eval()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("lowering,opset", [("dense", None), ("blocked", None), ("attention", 23)])
def test_reduced_precision_keeps_fully_masked_rows_zero(tmp_path, dtype, lowering, opset):
    layer, x = _layer(), torch.randn(2, 24, 32)
    path = tmp_path / "m.onnx"
    result = export_onnx(
        layer, [x], path, dtype=dtype, lowering=lowering, opset=opset, input_names=["x"], output_names=["y"]
    )
    assert result.precision == dtype and onnxfile.read_metadata(onnx.load(str(path)))["precision"] == dtype
    model = onnx.load(str(path))
    # inputs and outputs stay float32; weights (and any float table) are stored in the target dtype
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    stored = {t.data_type for t in model.graph.initializer if t.data_type in float_types and len(t.dims)}
    assert stored == {onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16}
    results = parity.compare_model(layer, [x], path, _runnable(dtype), runs=1)
    assert results and all(r.ok for r in results), parity.format_table(results)
    for name in _runnable(dtype):
        y = load(path, name).run({"x": x.numpy()})["y"]
        assert np.isfinite(y).all()
        with torch.no_grad():  # the empty rows give exactly proj(0) = the projection bias
            expected = layer.proj.bias.to(torch.float16 if dtype == "fp16" else torch.bfloat16).float().numpy()
        np.testing.assert_allclose(y[:, ::3], np.broadcast_to(expected, y[:, ::3].shape), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_with_a_dynamic_batch(tmp_path, dtype):
    """fp16 and bf16 wrap the model to cast its inputs and outputs: its batch axis stays dynamic through the wrap."""
    layer, path = _layer(), tmp_path / "m.onnx"
    export_onnx(layer, [torch.randn(1, 24, 32)], path, dtype=dtype, dynamic_batch=True, input_names=["x"])
    x = torch.randn(3, 24, 32)
    (runtime,) = _runnable(dtype)[:1]
    (y,) = load(path, runtime=runtime).run({"x": x.numpy()}).values()
    with torch.no_grad():
        want = layer(x).numpy()
    assert y.shape == want.shape and np.abs(y - want).max() < 5e-2 * np.abs(want).max()


def test_bf16_is_refused_where_it_cannot_run(tmp_path, capsys):
    layer, x = _layer(), torch.randn(1, 24, 32)
    with pytest.raises(EdgeAttnError, match="ort-cpu cannot run bf16 files: onnxruntime's CPU provider has no"):
        export_onnx(layer, [x], tmp_path / "m.onnx", dtype="bf16", runtimes=["ort-cpu"])
    with pytest.raises(EdgeAttnError, match=r"bf16 files need opset >= 22 .*pass --opset 22"):
        export_onnx(layer, [x], tmp_path / "m.onnx", dtype="bf16", opset=18)
    with pytest.raises(EdgeAttnError, match="--quantize int8 quantizes an fp32 export; drop --dtype fp16"):
        export_onnx(layer, [x], tmp_path / "m.onnx", dtype="fp16", quantize="int8")
    assert not (tmp_path / "m.onnx").exists()
    path = tmp_path / "ok.onnx"
    result = export_onnx(layer, [x], path, dtype="bf16", input_names=["x"], output_names=["y"])
    assert result.opset == 22 and "ort-cpu" not in result.targets  # bf16 defaults to opset 22 and its runtimes
    [ort] = parity.compare_model(layer, [x], path, ["ort-cpu"], runs=1)
    assert ort.status == "unavailable" and "no bfloat16 kernels" in ort.detail


def test_openvino_precision_hints(tmp_path):
    import openvino as ov

    layer, x = _layer(), torch.randn(1, 24, 32)
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for dtype, hint, capability in (("fp32", "f32", "FP32"), ("fp16", "f16", "FP16"), ("bf16", "bf16", "BF16")):
        path = tmp_path / f"{dtype}.onnx"
        export_onnx(layer, [x], path, dtype=dtype, input_names=["x"], output_names=["y"])
        deployed = load(path, "openvino-cpu")
        assert deployed.config == {"INFERENCE_PRECISION_HINT": hint if capability in capabilities else "f32"}
        assert load(path, "openvino-cpu", accuracy=True).config == {"EXECUTION_MODE_HINT": "ACCURACY"}
        y = deployed.run({"x": x.numpy()})["y"]
        with torch.no_grad():
            reference = layer(x).numpy()
        # the runtime's own gate for the file's precision: fp32 max abs 1e-4 (the hint keeps it f32 on a bf16
        # CPU), fp16/bf16 their error relative to the largest output and cosine
        tolerance = runtimes.get("openvino-cpu").tolerance(dtype)
        assert (tolerance.atol is not None) == (dtype == "fp32")
        metrics = parity.compare({"y": reference}, {"y": y})
        assert np.isfinite(y).all() and parity.passes(metrics, tolerance), (dtype, metrics, tolerance.describe())


@pytest.mark.parametrize("mode", ["int8", "int8-static"])
def test_int8_quantizes_linear_layers_only(tmp_path, mode):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / f"{mode}.onnx"
    export_registered("na2d-block", fp32)
    result = export_registered("na2d-block", int8, quantize=mode, custom_op=True)
    assert result.precision == mode and int8.stat().st_size < fp32.stat().st_size
    info = inspect_file(int8)
    quantized_ops = (
        {"ai.onnx::MatMulInteger", "ai.onnx::DynamicQuantizeLinear"}
        if mode == "int8"
        else {"ai.onnx::QuantizeLinear", "ai.onnx::DequantizeLinear"}
    )
    assert quantized_ops <= set(info["ops"])
    # attention stays one float edgeattn node with its standard-op body
    assert info["ops"]["edgeattn::MaskedAttention_blocked"] == 1
    assert not any(
        n.op_type in ("MatMulInteger", "QuantizeLinear") for f in onnx.load(str(int8)).functions for n in f.node
    )
    # the default (standard-op) file is quantized the same way: its inlined attention stays float
    standard = export_registered("na2d-block", tmp_path / "standard.onnx", quantize=mode).path
    standard_ops = inspect_file(standard)["ops"]
    assert all(standard_ops[op] == info["ops"][op] for op in quantized_ops)
    for path in (int8, standard):
        results = parity.check_file(path, CPU_RUNTIMES, runs=1)
        assert all(r.ok for r in results), parity.format_table(results)
        assert all(r.cosine >= REDUCED_PRECISION[mode].min_cosine for r in results)


def test_static_calibration_file(tmp_path, capsys):
    from edgeattn import models

    built = [models.build("na2d-block", seed=s) for s in (5, 6, 7)]
    data = tmp_path / "calib.npz"
    np.savez(data, tokens=np.stack([b.inputs["tokens"].numpy() for b in built]))
    out = tmp_path / "q.onnx"
    assert (
        main(
            [
                "export",
                "na2d-block",
                "-o",
                str(out),
                "--quantize",
                "int8-static",
                "--calibration",
                str(data),
                "--check",
                "--runs",
                "1",
            ]
        )
        == 0
    )
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 3)))
    code = main(
        [
            "export",
            "na2d-block",
            "-o",
            str(tmp_path / "bad.onnx"),
            "--quantize",
            "int8-static",
            "--calibration",
            str(tmp_path / "bad.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "calibration data lacks inputs ['tokens']" in err
    assert not (tmp_path / "bad.onnx").exists()


# Every lowering at every opset from 17 to 23 (Attention from 23), as a custom-op file and inlined.
OPSET_CASES = [(opset, low) for opset in range(17, 24) for low in ("dense", "blocked", "contrib")] + [(23, "attention")]


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
@pytest.mark.parametrize("opset,lowering", OPSET_CASES)
def test_every_opset_from_17_to_23(tmp_path, opset, lowering, custom_op):
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    x = torch.randn(2, 36, 16)
    targets = ["ort-cpu"] if lowering == "contrib" else None
    path = tmp_path / "m.onnx"
    export_onnx(
        layer,
        [x],
        path,
        opset=opset,
        lowering=lowering,
        custom_op=custom_op,
        runtimes=targets,
        input_names=["x"],
        output_names=["y"],
    )
    info = inspect_file(path)
    assert info["opsets"]["ai.onnx"] == opset
    expected_domains = (["edgeattn"] if custom_op else []) + (["com.microsoft"] if lowering == "contrib" else [])
    assert info["custom_domains"] == sorted(expected_domains)
    results = parity.compare_model(layer, [x], path, targets or CPU_RUNTIMES, runs=1)
    assert all(r.ok and r.max_abs_err <= 1e-5 for r in results), parity.format_table(results)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_ort_cuda_reduced_precision(tmp_path, dtype):
    from conftest import require

    require("ort-cuda")
    path = tmp_path / "m.onnx"
    export_registered("nat-tiny", path, dtype=dtype, runtimes=["ort-cuda"])
    results = parity.check_file(path, ["ort-cuda"], runs=5)
    assert all(r.ok for r in results), parity.format_table(results)


@pytest.mark.parametrize("name", ["ppma-t", "rmt-t"])
def test_bf16_conv_batchnorm_models_run_on_openvino(tmp_path, name):
    """The exporter's optimizer folds constants through numpy, which has no bfloat16: it left a float32 Conv weight
    in a bf16 graph (ppma-t's conv + BatchNorm stem).  bf16 exports skip it; the runtimes optimize anyway."""
    path = tmp_path / "m.onnx"
    export_registered(name, path, dtype="bf16", image_size=64, depths=[1, 1, 1, 1])
    results = parity.check_file(path, ["openvino-cpu"], runs=1)
    assert all(r.ok for r in results), parity.format_table(results)
