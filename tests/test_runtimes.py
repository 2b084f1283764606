import sys

import numpy as np
import pytest
import torch

import edgeattn
from edgeattn import EdgeAttnError, export_onnx, load, masks, runtimes
from edgeattn.layers import MaskedSelfAttention

from conftest import CPU_RUNTIMES, external_data_file, relocate_external_data, require


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(4, 4)).eval()
    x = torch.randn(1, 16, 16)
    path = tmp_path_factory.mktemp("rt") / "m.onnx"
    export_onnx(layer, [x], path, input_names=["x"], output_names=["y"])
    with torch.no_grad():
        return path, x.numpy(), layer(x).numpy(), layer


def test_registry_names_and_reasons(small_model):
    assert runtimes.runtime_names() == ["torch", "ort-cpu", "ort-cuda", "openvino-cpu", "litert"]
    path, x, expected, _ = small_model
    for runtime in (r for r in runtimes.RUNTIMES.values() if r.reference or "onnx" in r.file_formats):
        reasons = runtime.not_supported_reasons()
        if runtime.reference:
            assert reasons == []  # the PyTorch reference runs wherever edgeattn imports
        else:  # no reasons exactly when the runtime loads and runs a file here; otherwise loading says them
            try:
                got = edgeattn.load(path, runtime.name).run({"x": x})["y"]
            except EdgeAttnError as e:
                assert reasons and not runtime.is_available()
                assert str(e) == f"runtime {runtime.name} is not available: {'; '.join(reasons)}", e
                assert "\n" not in str(e)
            else:
                assert reasons == [] and runtime.is_available(), runtime.name
                np.testing.assert_allclose(got, expected, atol=runtime.tolerance("fp32").atol)
        assert runtime.tolerance("fp32").atol >= 0
    with pytest.raises(EdgeAttnError, match="unknown runtime 'tensorrt'; choose one of"):
        runtimes.get("tensorrt")


def test_runtimes_by_provider_and_device(small_model):
    """ort:<ExecutionProvider>[,options] and openvino:<DEVICE>: the common three keep their names, the others run
    the file on what they name (OpenVINO's AUTO and HETERO:CPU here), and what this machine lacks is one line."""
    path, x, expected, _ = small_model
    assert runtimes.get("ort:CPU") is runtimes.get("ort:CPUExecutionProvider") is runtimes.get("ort-cpu")
    assert runtimes.get("ort:CUDAExecutionProvider") is runtimes.get("ort-cuda")
    assert runtimes.get("openvino:CPU") is runtimes.get("openvino-cpu")
    with_options = runtimes.get("ort:OpenVINO,device_type=CPU,precision=FP32")
    assert with_options.name == "ort:OpenVINOExecutionProvider,device_type=CPU,precision=FP32"
    assert with_options._providers()[0] == ("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "FP32"})
    for name in ("openvino:AUTO", "openvino:HETERO:CPU"):
        got = edgeattn.load(path, name).run({"x": x})["y"]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    for name, message in [
        ("openvino:NPU", "runtime openvino:NPU is not available: OpenVINO here has no NPU device \\(it has CPU"),
        ("openvino:HETERO:GPU,CPU", "OpenVINO here has no GPU device"),
        ("ort:QNN", "QNNExecutionProvider is not among onnxruntime's providers .* onnxruntime-qnn package"),
    ]:
        with pytest.raises(EdgeAttnError, match=message) as e:
            edgeattn.load(path, name)
        assert "\n" not in str(e.value)
    for name, message in [
        ("ort:Foo", "onnxruntime has no provider FooExecutionProvider"),
        ("ort:OpenVINO,fast", "provider options are key=value"),
        ("openvino:", "name a device"),
        ("tensorrt:x", "unknown runtime 'tensorrt:x'"),
    ]:
        with pytest.raises(EdgeAttnError, match=message):
            runtimes.get(name)


def test_ort_cuda_explains_why_not(small_model):
    cuda = runtimes.get("ort-cuda")
    if cuda.is_available():
        pytest.skip("CUDA EP present; covered by the gpu test")
    reason = cuda.not_supported_reasons()[0]
    assert "CUDAExecutionProvider" in reason or "CUDA execution provider" in reason
    assert "'edgeattn[ort]'" not in reason
    with pytest.raises(EdgeAttnError, match="runtime ort-cuda is not available"):
        edgeattn.load(small_model[0], "ort-cuda")


def test_install_hints_name_the_extra_that_has_the_provider(monkeypatch):
    # the CUDA provider ships only in onnxruntime-gpu, which edgeattn[ort-gpu] installs; edgeattn[ort] never has it
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails, as when not installed
    cpu, cuda = runtimes.get("ort-cpu"), runtimes.get("ort-cuda")
    assert cpu.machine_reasons() == ["onnxruntime is not installed; install it with: pip install 'edgeattn[ort]'"]
    uncached = type(cuda).machine_reasons.__wrapped__  # the cached probe must not keep this fake answer
    assert uncached(cuda) == ["onnxruntime is not installed; install it with: pip install 'edgeattn[ort-gpu]'"]


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_session_runs_and_describes_io(small_model, name):
    require(name)
    path, x, expected, _ = small_model
    session = edgeattn.load(path, name)
    assert session.runtime == name
    assert [(i.name, i.shape, i.dtype) for i in session.inputs] == [("x", (1, 16, 16), np.dtype("float32"))]
    assert [o.name for o in session.outputs] == ["y"]
    np.testing.assert_allclose(session.run({"x": x})["y"], expected, atol=1e-5)
    # a non-contiguous view is accepted
    wide = np.repeat(x, 2, axis=2)[:, :, ::2]
    np.testing.assert_allclose(session.run({"x": wide})["y"], expected, atol=1e-5)


def _flushes_denormals() -> bool:
    return bool(np.float32(1e-39) * np.float32(1.0) == 0)


def test_ort_flushes_denormals_only_while_it_runs(tmp_path, monkeypatch):
    """onnxruntime sessions flush denormals (masked keys' exp makes them, slowly) on its threads and, while it runs,
    on the caller's; the caller's thread is left as it was, and the outputs stay bitwise a plain session's."""
    require("ort-cpu")
    import onnxruntime as ort

    torch.manual_seed(0)
    layer = MaskedSelfAttention(16, 2, masks.sliding_window(8), seq_len=64).eval()
    x = torch.randn(1, 64, 16)
    path = tmp_path / "sliding.onnx"
    export_onnx(layer, [x], path, input_names=["x"], output_names=["y"])
    assert not _flushes_denormals()
    session = edgeattn.load(path, "ort-cpu")  # before any plain session: only then does onnxruntime's option
    assert not _flushes_denormals()  # set the creating thread's flags, which load restores
    options = session._session.get_session_options()
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    during = []
    set_flush = torch.set_flush_denormal
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: during.append(on) or set_flush(on))
    out = session.run({"x": x.numpy()})["y"]
    assert during == [True, False] and not _flushes_denormals()
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x.numpy()})[0]
    np.testing.assert_array_equal(out, plain)


def test_auto_prefers_onnxruntime(small_model):
    require("ort-cpu")
    if runtimes.get("ort-cuda").is_available():
        pytest.skip("auto picks CUDA here")
    assert edgeattn.load(small_model[0]).runtime == "ort-cpu"


@pytest.mark.parametrize("name", CPU_RUNTIMES)
@pytest.mark.parametrize(
    "feeds, message",
    [
        ({}, r"missing \['x'\]"),
        ({"x": np.zeros((1, 16, 16), np.float32), "z": np.zeros(1)}, r"unexpected \['z'\]"),
        ({"x": np.zeros((1, 16, 16), np.float64)}, "input 'x': expected dtype float32, got float64"),
        ({"x": np.zeros((1, 15, 16), np.float32)}, r"input 'x': expected shape \(1, 16, 16\), got \(1, 15, 16\)"),
        ({"x": np.zeros((16, 16), np.float32)}, r"input 'x': expected shape"),
    ],
)
def test_bad_feeds_get_the_same_clear_error(small_model, name, feeds, message):
    require(name)
    with pytest.raises(EdgeAttnError, match=message):
        edgeattn.load(small_model[0], name).run(feeds)


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_bad_files_are_refused_clearly(tmp_path, name):
    require(name)
    with pytest.raises(EdgeAttnError, match="no such file"):
        edgeattn.load(tmp_path / "missing.onnx", name)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(EdgeAttnError, match="not an ONNX model"):
        edgeattn.load(junk, name)


def test_torch_runtime_runs_the_module_it_is_given(small_model):
    path, x, expected, layer = small_model
    with pytest.raises(EdgeAttnError, match="runs the PyTorch module the file came from"):
        edgeattn.load(path, "torch")
    np.testing.assert_array_equal(edgeattn.load(path, "torch", module=layer).run({"x": x})["y"], expected)


@pytest.mark.gpu
def test_ort_cuda_parity(small_model):
    require("ort-cuda")
    path, x, expected, _ = small_model
    y = edgeattn.load(path, "ort-cuda").run({"x": x})["y"]
    np.testing.assert_allclose(y, expected, atol=runtimes.get("ort-cuda").tolerance().atol)


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_external_data_files_load(tmp_path, name):
    model, path = external_data_file(tmp_path)
    x = torch.randn(2, 512)
    (y,) = load(path, name).run({"x": x.numpy()}).values()
    np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_external_data_outside_the_folder_is_refused(tmp_path, name):
    _, path = external_data_file(tmp_path)
    relocate_external_data(path, "../elsewhere.data")
    with pytest.raises(EdgeAttnError, match="not a file inside"):
        load(path, name)


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_non_contiguous_and_nonfinite_feeds(small_model, name):
    require(name)
    path, x, _, _ = small_model
    session = edgeattn.load(path, name)
    base = np.asarray(x, dtype=np.float32)
    strided = np.asfortranarray(base)  # same values, not C-contiguous
    np.testing.assert_array_equal(session.run({"x": strided})["y"], session.run({"x": base})["y"])
    bad = base.copy()
    bad[0, 3, 1], bad[0, 15, 2] = np.nan, np.inf
    out = session.run({"x": bad})["y"]  # runs; NaN stays where attention reads it
    assert np.isnan(out).any()
    from edgeattn.runtimes.base import nonfinite_inputs

    assert nonfinite_inputs({"x": bad}) == ["x"] and nonfinite_inputs({"x": base}) == []


def test_parity_report_flags_nonfinite_inputs(small_model):
    from edgeattn import parity

    path, x = small_model[0], small_model[1].copy()
    x[0, 0, 0] = np.nan
    reference = edgeattn.load(path, "ort-cpu").run({"x": x})
    (result,) = parity.check_sessions(reference, {"x": x}, path, ["ort-cpu"], runs=1)
    assert "inputs with NaN/inf: x" in result.detail and "inputs with NaN/inf" in parity.format_table([result])
