"""torch -> ONNX: trace the model under its lowering plan with the dynamo exporter, finalize the graph, quantize if
asked, save atomically."""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import onnx
import torch

from .. import onnxfile
from ..convert import flex
from ..errors import EdgeAttnError, ExportFailed, InvalidArgument, first_line
from . import graph, precision, repository, writers
from .plan import applied
from .quiet import quiet
from .request import ExportRequest, check_request


@dataclass
class ExportResult:
    path: Path
    opset: int
    custom_op: bool
    lowering: str
    targets: list[str]
    precision: str = "fp32"
    masks: list[dict] = field(default_factory=list)  # one entry per attention node
    table_bytes: int = 0  # unique mask-table bytes in the file
    file_bytes: int = 0
    metadata: dict = field(default_factory=dict, repr=False)  # the file's edgeattn.* metadata
    parity: list = field(default_factory=list)  # ParityResults, when the export was checked
    format: str = "onnx"  # onnx, openvino (IR) or ort


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path,
    *,
    opset: Optional[int] = None,
    custom_op: bool = False,
    lowering: str = "auto",
    runtimes: Optional[Sequence[str]] = None,
    dynamic_batch: bool = False,
    batch_axes: Optional[Sequence[Optional[int]]] = None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    metadata_props: Optional[dict[str, Any]] = None,
    dtype: str = "fp32",
    quantize: Optional[str] = None,
    calibration: Optional[Sequence[dict]] = None,
    format: Optional[str] = None,
) -> ExportResult:
    """Export ``model`` at the example inputs' shapes.

    Each attention becomes the standard ops of its lowering (``lowering``: auto, dense, blocked, attention, contrib;
    see :mod:`edgeattn.export.plan`), chosen for the target ``runtimes`` (default: every ONNX runtime), so the
    file runs without edgeattn anywhere; ``custom_op=True`` keeps each as one ``edgeattn`` node whose model-local
    function is that body (see :mod:`edgeattn.export.graph`).
    ``dynamic_batch=True`` makes the batch axis of every input symbolic (``batch``): axis 0, or per input
    ``batch_axes`` (None for an input without one, e.g. a KV cache is (layers, batch, ...)); mask tables do not
    depend on it.
    ``dtype`` (fp32, fp16, bf16) is the precision of weights and compute, with float32 inputs and outputs;
    ``quantize`` (int8: dynamic, int8-static: QDQ calibrated on ``calibration`` feeds, generated from the example
    inputs' shapes when not given) quantizes the linear layers of an fp32 export (see
    :mod:`edgeattn.export.precision`).  ``opset`` defaults to 18 (22 for bf16).  ``format``: onnx, openvino (IR,
    ``.xml``) or ort (``.ort``), by default from the path's suffix (see :mod:`edgeattn.export.writers`), or a model
    server repository folder: triton or ovms (see :mod:`edgeattn.export.repository`).  The file is
    replaced only on success."""
    request = check_request(
        dtype=dtype,
        quantize=quantize,
        opset=opset,
        lowering=lowering,
        runtimes=runtimes,
        custom_op=custom_op,
        dynamic_batch=dynamic_batch,
        path=path,
        format=format,
    )
    return export_checked(
        model,
        example_inputs,
        path,
        request,
        batch_axes=batch_axes,
        input_names=input_names,
        output_names=output_names,
        metadata_props=metadata_props,
        calibration=calibration,
    )


def export_checked(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path,
    request: ExportRequest,
    *,
    batch_axes=None,
    input_names=None,
    output_names=None,
    metadata_props=None,
    calibration=None,
    named_axes: Optional[Sequence[Optional[dict[int, str]]]] = None,
) -> ExportResult:
    """:func:`export_onnx` for a request already checked (and a writable ``path``).  ``named_axes``: per input, its
    symbolic axes by name ({0: "batch", 1: "tokens"}), for exports with more than a dynamic batch (an LM step
    whose prompt length varies); example sizes of 1 on those axes are the caller's to avoid."""
    clash = sorted(set(metadata_props or {}) & set(onnxfile.RESERVED_METADATA))
    if clash:
        raise InvalidArgument(f"metadata_props may not set {clash}: edgeattn writes those keys itself")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    was_training = model.training
    if named_axes is None and request.dynamic_batch:
        axes = list(batch_axes) if batch_axes is not None else [0 if t.ndim else None for t in example_inputs]
        if len(axes) != len(example_inputs):
            raise InvalidArgument(f"batch_axes has {len(axes)} entries for {len(example_inputs)} inputs")
        named_axes = [None if a is None else {a: "batch"} for a in axes]
        # torch.export specializes a size-1 example axis to the constant 1: trace with a batch of 2 instead
        example_inputs = [
            t if a is None or t.shape[a] != 1 else t.expand(*t.shape[:a], 2, *t.shape[a + 1 :])
            for t, a in zip(example_inputs, axes)
        ]
    dynamic = None
    if named_axes is not None:  # one Dim per name, shared by the inputs that name it
        dims: dict[str, Any] = {}
        dynamic = tuple(
            None
            if axes is None
            else {a: dims.setdefault(n, torch.export.Dim(n, min=1, max=65536)) for a, n in axes.items()}
            for axes in named_axes
        )
    try:
        # the plan switches the model's table layouts; a reduced-precision copy is made of the switched model;
        # flex_attention calls of an unconverted model get tables for the time of the export
        with (
            torch.no_grad(),
            quiet(),
            flex.converted_for_export(model.eval(), example_inputs),
            applied(model, request.lowering, request.opset, precision.name_prefix(request.dtype)) as plan,
        ):
            traced = precision.in_dtype(model, request.dtype)
            if dynamic is not None:
                dynamic = _as_signature(traced, dynamic)
            # bf16 skips the exporter's optimizer: its constant folding goes through numpy (no bfloat16) and left
            # float32 Conv weights in bf16 graphs; the runtimes optimize the graph themselves
            program = torch.onnx.export(
                traced,
                tuple(example_inputs),
                dynamo=True,
                opset_version=request.opset,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
                dynamic_shapes=dynamic,
                optimize=request.dtype != "bf16",
            )
    except EdgeAttnError:
        raise
    except Exception as e:  # the exporter's own errors are long; keep the cause chained for debugging
        raise ExportFailed(f"torch.onnx export failed: {first_line(e)}") from e
    finally:
        model.train(was_training)
    proto = program.model_proto
    written = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), request.opset)
    if written != request.opset:  # torch.onnx keeps its own opset when it cannot convert down (its warning scrolls by)
        raise ExportFailed(
            f"torch.onnx wrote opset {written}, not the {request.opset} asked for: it could not "
            f"convert this model's ops to opset {request.opset}; export with --opset {written}"
        )
    masks, table_bytes = graph.finalize(proto, request, plan, extra=metadata_props)
    if request.quantize:
        if request.quantize == "int8-static" and not calibration:
            calibration = _random_feeds(example_inputs, input_names, precision.DEFAULT_CALIBRATION_SAMPLES)
        proto = _quantized(proto, request.quantize, calibration)  # attention nodes hide their MatMuls from it
    if not request.custom_op:
        graph.inline(proto)
    metadata = onnxfile.read_metadata(proto)
    if request.repository:  # the result names the model file inside, which `check` reads
        path, written = repository.write_repository(request.repository, proto, path, metadata, request.format)
    elif request.format == "openvino":
        written = writers.write_openvino_ir(proto, path, metadata)
    elif request.format == "ort":
        written = writers.write_ort_format(proto, path)
    else:
        written = onnxfile.save(proto, path)
    return ExportResult(
        Path(path),
        request.opset,
        request.custom_op,
        request.lowering,
        list(request.targets),
        request.precision,
        masks,
        table_bytes,
        file_bytes=written,
        metadata=metadata,
        format=request.format,
    )


def _quantized(proto: onnx.ModelProto, mode: str, calibration) -> onnx.ModelProto:
    """Run onnxruntime's quantizer on ``proto`` (it works on files) and return the quantized model."""
    with tempfile.TemporaryDirectory(prefix="edgeattn-quantize-") as folder:
        src, dst = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(proto, str(src))
        precision.quantize(src, dst, mode, calibration)
        quantized = onnx.load(str(dst))
    del quantized.metadata_props[:]  # the quantizer keeps them, but its own copy may lag behind: take ours
    quantized.metadata_props.extend(proto.metadata_props)
    return quantized


def _random_feeds(example_inputs, names, count: int) -> list[dict]:
    """Calibration feeds shaped like the example inputs: normal noise for float inputs, the example otherwise."""
    generator = torch.Generator().manual_seed(0)
    names = list(names) if names else [f"input_{i}" for i in range(len(example_inputs))]
    return [
        {
            n: (torch.randn(t.shape, generator=generator) if t.is_floating_point() else t).numpy()
            for n, t in zip(names, example_inputs)
        }
        for _ in range(count)
    ]


def _as_signature(model: torch.nn.Module, dynamic: tuple) -> tuple:
    """torch.export wants dynamic shapes in the structure of ``forward``'s parameters: the entries of the inputs
    that a ``*args`` parameter takes (CastIO's ``*inputs``, an LM step's ``*past``) go in one tuple."""
    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        return dynamic
    at = kinds.index(inspect.Parameter.VAR_POSITIONAL)
    return (*dynamic[:at], tuple(dynamic[at:]))
