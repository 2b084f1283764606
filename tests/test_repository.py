"""`edgeattn export --format triton / ovms`: model server repositories, each config checked against the server's own
schema (Triton's ModelConfig protobuf from tritonclient, OVMS's model_config_list layout) and each model file run with
the plain runtime against the torch reference."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
import torch

from edgeattn import models, runtimes
from edgeattn.cli import main

MODEL = "na2d-block"  # one attention layer: the smallest registered model with a real mask

tritonclient = pytest.importorskip("tritonclient")
from google.protobuf import text_format  # noqa: E402  (tritonclient brings protobuf along)


def _model_config_pb2():
    """Triton's model-config protobuf, without tritonclient.grpc's import of grpc (which the schema does not use)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()
ModelConfig = model_config_pb2.ModelConfig


def export(folder: Path, *args) -> Path:
    assert main(["export", MODEL, "-o", str(folder), *args]) == 0
    return folder / MODEL


def parsed(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), ModelConfig())


def reference(batch: int = 1):
    built = models.build(MODEL)
    tokens = built.inputs["tokens"].expand(batch, -1, -1).clone()
    tokens[1:] = torch.randn(tokens[1:].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return tokens.numpy(), built.module(tokens).numpy()


def atol(runtime: str) -> float:
    return runtimes.get(runtime).tolerance("fp32").atol


@pytest.fixture(scope="module")
def triton_onnx(tmp_path_factory):
    return export(tmp_path_factory.mktemp("triton"), "--format", "triton", "--dynamic-batch")


def test_schema_rejects_a_misspelt_field():
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "m"\nmax_batch_sise: 4\n', ModelConfig())


def test_triton_onnxruntime_repository_with_dynamic_batch(triton_onnx):
    config = parsed(triton_onnx)
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    session = ort.InferenceSession(str(triton_onnx / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in zip([*config.input, *config.output], [*session.get_inputs(), *session.get_outputs()]):
        assert (declared.name, model_config_pb2.DataType.Name(declared.data_type)) == (actual.name, "TYPE_FP32")
        assert actual.type == "tensor(float)"
        assert isinstance(actual.shape[0], str) and list(declared.dims) == actual.shape[1:]  # batch axis left out
    tokens, expected = reference(batch=2)
    (out,) = session.run(None, {config.input[0].name: tokens})
    assert np.abs(out - expected).max() <= atol("ort-cpu")


def test_triton_openvino_repository_static(tmp_path):
    model_dir = export(tmp_path, "--format", "triton", "--runtime", "openvino-cpu")
    config = parsed(model_dir)
    assert (config.backend, config.max_batch_size, config.default_model_filename) == ("openvino", 0, "model.xml")
    assert not config.HasField("dynamic_batching")
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(model_dir / "1" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for declared, ports in [(config.input, compiled.inputs), (config.output, compiled.outputs)]:
        assert [(t.name, list(t.dims)) for t in declared] == [(p.get_any_name(), list(p.shape)) for p in ports]
    tokens, expected = reference()
    out = compiled({"tokens": tokens})[config.output[0].name]
    assert np.abs(out - expected).max() <= atol("openvino-cpu")


def test_ovms_repository_keeps_other_models_and_replaces_its_own(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_config_list": [
                    {"config": {"name": "other", "base_path": "other"}},
                    {"config": {"name": MODEL, "base_path": "stale"}},
                ]
            }
        )
    )
    (tmp_path / MODEL / "7").mkdir(parents=True)  # an older export's version folder goes with the replaced model
    model_dir = export(tmp_path, "--format", "ovms")
    entries = json.loads((tmp_path / "config.json").read_text())["model_config_list"]
    assert [e["config"] for e in entries] == [
        {"name": "other", "base_path": "other"},
        {"name": MODEL, "base_path": MODEL},
    ]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", MODEL]  # no staging folder left
    compiled = ov.Core().compile_model(
        str(tmp_path / MODEL / "1" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    tokens, expected = reference()
    assert np.abs(compiled({"tokens": tokens})["output"] - expected).max() <= atol("openvino-cpu")


@pytest.mark.parametrize("kind", ["triton", "ovms"])
def test_bad_output_is_one_error_and_writes_nothing(tmp_path, capsys, kind):
    file = tmp_path / "models.onnx"
    file.write_text("")
    assert main(["export", MODEL, "--format", kind, "-o", str(file)]) == 2
    assert "is a file; a repository is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.onnx"]


def test_unreadable_ovms_config_is_one_error_before_the_export(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["export", MODEL, "--format", "ovms", "-o", str(tmp_path)]) == 2
    assert "config.json: not an OpenVINO Model Server config" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
