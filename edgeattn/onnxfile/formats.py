"""The files edgeattn writes and reads, by suffix: ONNX (``.onnx``), OpenVINO IR (``.xml`` + ``.bin``) and the ORT
format (``.ort``, onnxruntime's mobile and minimal builds).  Each carries the same ``edgeattn.*`` metadata, so
``check`` rebuilds the torch reference of any of them:

- ONNX: ``metadata_props``;
- OpenVINO IR: the model's ``rt_info`` section ``edgeattn`` (:data:`IR_SECTION`), values encoded as in ONNX;
- ORT format: the ONNX model's ``metadata_props``, which the conversion keeps;
- TFLite (``.tflite``, from onnx2tf): none; :func:`converted_from` reads it from the ONNX file it came from.

:func:`header` reads what every consumer needs first (format, metadata, inputs, outputs) without loading weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BadFile, RuntimeUnavailable, first_line
from . import (
    TensorInfo,
    decode_metadata,
    encode_metadata,
    graph_inputs,
    graph_outputs,
    read,
    read_metadata,
    strip_prefix,
)

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "ort": ".ort", "tflite": ".tflite"}
# model server repositories (folders): the file format inside is onnx or openvino (see edgeattn.export.repository)
REPOSITORIES = {"triton": "Triton Inference Server", "ovms": "OpenVINO Model Server"}
IR_SECTION = "edgeattn"


def format_of(path) -> str:
    """The format a path names by its suffix; anything else is read as ONNX."""
    suffix = Path(path).suffix.lower()
    return next((name for name, s in FORMATS.items() if s == suffix), "onnx")


@dataclass(frozen=True)
class Header:
    path: Path
    format: str
    metadata: dict
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


def form_of(metadata: Mapping[str, Any]) -> str:
    """How a file stores its attention: ``standard`` (ops only, the default), ``custom-op``, or its deployment
    format (``openvino``, ``ort``)."""
    if metadata.get("format", "onnx") != "onnx":
        return metadata["format"]
    return "standard" if metadata.get("inline", True) else "custom-op"


def header(path) -> Header:
    """Format, ``edgeattn.*`` metadata, inputs and outputs of a file of any format, or one clear error."""
    path = Path(path)
    kind = format_of(path)
    if kind == "onnx":
        model = read(path)
        return Header(path, kind, read_metadata(model), graph_inputs(model), graph_outputs(model))
    if not path.is_file():
        raise BadFile(f"{path}: no such file")
    if kind == "tflite":
        return _tflite_header(path)
    return ir_header(path, read_ir(path)) if kind == "openvino" else _ort_header(path)


def converted_from(file: Header, source) -> Header:
    """``file``'s header with the metadata of the edgeattn file it was converted from (``source``: a TFLite model
    from onnx2tf carries none of its own), but for its target runtimes, and its inputs and outputs in the source's
    order (what example inputs follow); each must be there by name."""
    given = header(source)
    inputs, outputs = {i.name: i for i in file.inputs}, {o.name: o for o in file.outputs}
    missing = [t.name for t in given.inputs + given.outputs if t.name not in inputs and t.name not in outputs]
    if missing:
        raise BadFile(
            f"{file.path}: has no tensor named {', '.join(missing)}, which {source} has (it has "
            f"{', '.join([*inputs, *outputs])}); was it converted from {source}?"
        )
    metadata = {k: v for k, v in given.metadata.items() if k != "targets"}  # what loads the new format runs it
    return Header(
        file.path,
        file.format,
        {**metadata, "format": file.format},
        [inputs[i.name] for i in given.inputs],
        [outputs[o.name] for o in given.outputs],
    )


def write_ir_metadata(ov_model, values: Mapping[str, Any]) -> None:
    for key, text in encode_metadata(values).items():
        ov_model.set_rt_info(text, [IR_SECTION, key])


def read_ir_metadata(ov_model) -> dict[str, Any]:
    """An IR's edgeattn metadata: the ``edgeattn`` section edgeattn writes, or the ``framework`` section where
    ``ovc`` and ``openvino.convert_model`` keep an ONNX file's ``metadata_props`` (``edgeattn.*`` keys).  An IR whose
    weights ``ovc`` compressed to fp16 (its default) says so under ``weights``."""
    if ov_model.has_rt_info([IR_SECTION]):
        metadata = decode_metadata({k: v.astype(str) for k, v in ov_model.get_rt_info()[IR_SECTION].items()})
    elif ov_model.has_rt_info(["framework"]):
        framework = strip_prefix({k: v.astype(str) for k, v in ov_model.get_rt_info()["framework"].items()})
        # the ONNX file's targets do not carry over: an IR runs on OpenVINO
        metadata = {**framework, "format": "openvino"} if framework else {}
        metadata.pop("targets", None)
    else:
        return {}
    if metadata.get("precision", "fp32") == "fp32" and _fp16_weights(ov_model):
        metadata["weights"] = "fp16"
    return metadata


def _fp16_weights(ov_model) -> bool:
    """Whether an IR stores float weights as f16 constants decompressed to f32 at load (ovc's compress_to_fp16)."""
    import openvino as ov

    return any(
        op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16 for op in ov_model.get_ordered_ops()
    )


def read_ir(path, core=None):
    """The ``openvino.Model`` of an IR ``.xml`` (its ``.bin`` beside it), or one clear error."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable(
            f"{path}: reading OpenVINO IR needs openvino: pip install 'edgeattn[openvino]'"
        ) from None
    bin_path = Path(path).with_suffix(".bin")
    if not bin_path.is_file():
        raise BadFile(f"{path}: its weights file {bin_path.name} is missing; keep the .xml and .bin together")
    try:
        return (core or ov.Core()).read_model(str(path), str(bin_path))
    except Exception as e:
        raise BadFile(f"{path}: not a readable OpenVINO IR: {first_line(e)}") from None


def ir_header(path, model) -> Header:
    """The header of the IR at ``path``, already read as the ``openvino.Model`` ``model``."""

    def info(port) -> TensorInfo:
        shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
        return TensorInfo(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()))

    return Header(
        Path(path),
        "openvino",
        read_ir_metadata(model),
        [info(p) for p in model.inputs],
        [info(p) for p in model.outputs],
    )


# onnxruntime's type strings -> numpy
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def tflite_interpreter(path: Path):
    """A LiteRT interpreter on ``path`` and its signature runner, or one clear error."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise RuntimeUnavailable(
            f"{path}: reading TFLite needs ai-edge-litert: pip install 'edgeattn[litert]'"
        ) from None
    if not path.is_file():
        raise BadFile(f"{path}: no such file")
    try:
        made = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
    except Exception as e:
        raise BadFile(f"{path}: not a readable TFLite model: {first_line(e)}") from None
    if not made.get_signature_list():
        raise BadFile(
            f"{path}: the TFLite model has no signature, so its inputs have no names to feed; convert it with "
            "onnx2tf, which writes one with the ONNX names"
        )
    return made, made.get_signature_runner()


def tflite_io(runner) -> tuple[list[TensorInfo], list[TensorInfo]]:
    def infos(details: dict) -> list[TensorInfo]:
        return [
            TensorInfo(name, tuple(int(n) for n in d["shape"]), np.dtype(d["dtype"])) for name, d in details.items()
        ]

    return infos(runner.get_input_details()), infos(runner.get_output_details())


def _tflite_header(path: Path) -> Header:
    inputs, outputs = tflite_io(tflite_interpreter(path)[1])
    return Header(path, "tflite", {}, inputs, outputs)


def _ort_header(path: Path) -> Header:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable(
            f"{path}: reading the ORT format needs onnxruntime: pip install 'edgeattn[ort]'"
        ) from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BadFile(f"{path}: not a readable ORT-format model: {first_line(e)}") from None

    def info(arg) -> TensorInfo:
        shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
        return TensorInfo(arg.name, shape, np.dtype(_ORT_TYPES.get(arg.type, np.float32)))

    meta = strip_prefix(session.get_modelmeta().custom_metadata_map)
    return Header(path, "ort", meta, [info(a) for a in session.get_inputs()], [info(a) for a in session.get_outputs()])
