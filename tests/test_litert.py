"""The ``litert`` runtime on a small TFLite model built here with LiteRT's own flatbuffer schema (y = x + x, with the
signature onnx2tf writes); TFLite files converted by onnx2tf from registered models are checked against PyTorch in
the onnx2tf job (docs/deploy/tflite.md)."""

import flatbuffers
import numpy as np
import pytest

import edgeattn
from edgeattn import EdgeAttnError, runtimes
from edgeattn.cli import main

from conftest import require

schema = pytest.importorskip("ai_edge_litert.schema_py_generated")


def tflite_file(path, signature: bool = True):
    """y = x + x on (1, 4) float32, with a signature naming x and y (as onnx2tf writes them) unless told not to."""
    model, graph, op, code = schema.ModelT(), schema.SubGraphT(), schema.OperatorT(), schema.OperatorCodeT()
    model.version, model.buffers = 3, [schema.BufferT() for _ in range(3)]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    model.operatorCodes = [code]
    graph.tensors = []
    for i, name in enumerate(("x", "y")):
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.buffer, tensor.name = [1, 4], schema.TensorType.FLOAT32, i + 1, name
        graph.tensors.append(tensor)
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
    graph.operators, graph.inputs, graph.outputs, graph.name = [op], [0], [1], "main"
    model.subgraphs = [graph]
    if signature:
        sig, x, y = schema.SignatureDefT(), schema.TensorMapT(), schema.TensorMapT()
        (x.name, x.tensorIndex), (y.name, y.tensorIndex) = ("x", 0), ("y", 1)
        sig.signatureKey, sig.subgraphIndex, sig.inputs, sig.outputs = "serving_default", 0, [x], [y]
        model.signatureDefs = [sig]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


def test_litert_runs_a_tflite_file_by_its_signature(tmp_path):
    require("litert")
    session = edgeattn.load(tflite_file(tmp_path / "m.tflite"))  # auto: a .tflite goes to LiteRT
    assert session.runtime == "litert"
    assert [(i.name, i.shape, i.dtype) for i in session.inputs] == [("x", (1, 4), np.float32)]
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(session.run({"x": x})["y"], 2 * x)
    with pytest.raises(EdgeAttnError, match=r"input 'x': expected shape \(1, 4\), got \(1, 5\)"):
        session.run({"x": np.zeros((1, 5), np.float32)})
    assert runtimes.available("tflite") == ["litert"] and "litert" not in runtimes.available()  # ONNX by default


def test_tflite_files_litert_cannot_use_are_one_line_errors(tmp_path, registered_file, capsys):
    require("litert")
    with pytest.raises(EdgeAttnError, match="litert does not load onnx files \\(it loads tflite\\)"):
        edgeattn.load(registered_file("na2d-block"), "litert")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(EdgeAttnError, match="junk.tflite: not a readable TFLite model"):
        edgeattn.load(tmp_path / "junk.tflite", "litert")
    with pytest.raises(EdgeAttnError, match="has no signature, so its inputs have no names"):
        edgeattn.load(tflite_file(tmp_path / "bare.tflite", signature=False), "litert")
    good = tflite_file(tmp_path / "m.tflite")
    assert main(["check", str(good)]) == 2
    assert "a TFLite model carries no edgeattn metadata; name the .onnx file it was converted from" in (
        capsys.readouterr().err
    )
    assert main(["check", str(good), "--source", str(registered_file("na2d-block"))]) == 2
    err = capsys.readouterr().err
    assert "has no tensor named tokens, output, which" in err and "was it converted from" in err
    assert err.count("\n") == 1
