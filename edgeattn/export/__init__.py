"""torch -> ONNX.  ``export_onnx`` runs the dynamo exporter, then gives every ``edgeattn.MaskedAttention`` node its
standard-op body as a model-local function (or inlines it), records metadata, checks and saves atomically."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import onnx
import onnx.inliner
import torch
from onnx import numpy_helper

from .. import __version__
from .._files import atomic_write, check_writable
from ..attention import ONNX_DOMAIN, TABLE_INPUTS
from ..errors import EdgeAttnError, first_line
from . import functions, lowering as lowerings, metadata, precision as precisions

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 25   # the range exported and run on onnxruntime and OpenVINO here
RESERVED_METADATA = ("version", "opset", "inline", "masks", "table_bytes", "lowering", "targets", "dynamic_batch",
                     "precision")
_FIRST_TABLE_INPUT = 3   # MaskedAttention inputs: q, k, v, then the table's tensors (the optional bias last)


@dataclass
class ExportResult:
    path: Path
    opset: int
    inline: bool
    lowering: str
    targets: list[str]
    precision: str = "fp32"
    masks: list[dict] = field(default_factory=list)   # one entry per attention node
    table_bytes: int = 0                              # unique mask-table bytes in the file
    file_bytes: int = 0


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path, *, opset: Optional[int] = None,
                inline: bool = False, lowering: str = "auto", runtimes: Optional[Sequence[str]] = None,
                dynamic_batch: bool = False, batch_axes: Optional[Sequence[Optional[int]]] = None,
                input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, metadata_props: Optional[dict[str, Any]] = None,
                dtype: str = "fp32", quantize: Optional[str] = None,
                calibration: Optional[Sequence[dict]] = None) -> ExportResult:
    """Export ``model`` at the example inputs' shapes.

    By default attention stays one ``edgeattn`` node whose local function is the standard-op lowering
    (``lowering``: auto, dense, blocked, attention, contrib; see :mod:`edgeattn.export.lowering`), chosen for the
    target ``runtimes`` (default: every ONNX runtime); ``inline=True`` writes standard ops only.
    ``dynamic_batch=True`` makes the batch axis of every input symbolic (``batch``): axis 0, or per input
    ``batch_axes`` (None for an input without one, e.g. a KV cache is (layers, batch, ...)); mask tables do not
    depend on it.
    ``dtype`` (fp32, fp16, bf16) is the precision of weights and compute, with float32 inputs and outputs;
    ``quantize`` (int8: dynamic, int8-static: QDQ calibrated on ``calibration`` feeds, generated from the example
    inputs' shapes when not given) quantizes the linear layers of an fp32 export (see
    :mod:`edgeattn.export.precision`).  ``opset`` defaults to 18 (22 for bf16).  The file is replaced only on
    success."""
    precision, opset, targets = _check_request(dtype, quantize, opset, runtimes, lowering)
    check_writable(path)
    clash = sorted(set(metadata_props or {}) & set(RESERVED_METADATA))
    if clash:
        raise EdgeAttnError(f"metadata_props may not set {clash}: edgeattn writes those keys itself")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    was_training = model.training
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        axes = list(batch_axes) if batch_axes is not None else [0 if t.ndim else None for t in example_inputs]
        if len(axes) != len(example_inputs):
            raise EdgeAttnError(f"batch_axes has {len(axes)} entries for {len(example_inputs)} inputs")
        dynamic = tuple(None if a is None else {a: batch} for a in axes)
        # torch.export specializes a size-1 example axis to the constant 1: trace with a batch of 2 instead
        example_inputs = [t if a is None or t.shape[a] != 1 else t.expand(*t.shape[:a], 2, *t.shape[a + 1:])
                          for t, a in zip(example_inputs, axes)]
    try:
        # bf16 skips the exporter's optimizer: its constant folding goes through numpy (no bfloat16) and left
        # float32 Conv weights in bf16 graphs; the runtimes optimize the graph themselves
        with torch.no_grad(), _quiet(), lowerings.applied(model, lowering, opset, targets):
            program = torch.onnx.export(precisions.in_dtype(model.eval(), dtype), tuple(example_inputs), dynamo=True,
                                        opset_version=opset, input_names=input_names, output_names=output_names,
                                        verbose=False, dynamic_shapes=dynamic, optimize=dtype != "bf16")
    except EdgeAttnError:
        raise
    except Exception as e:  # the exporter's own errors are long; keep the cause chained for debugging
        raise EdgeAttnError(f"torch.onnx export failed: {first_line(e)}") from e
    finally:
        model.train(was_training)
    proto = program.model_proto
    extra = {"lowering": lowering, "targets": targets, "dynamic_batch": dynamic_batch, "precision": precision,
             **(metadata_props or {})}
    masks, table_bytes = finalize(proto, opset=opset, inline=inline, requested=lowering, targets=targets, extra=extra)
    if quantize:
        if quantize == "int8-static" and not calibration:
            calibration = _random_feeds(example_inputs, input_names, precisions.DEFAULT_CALIBRATION_SAMPLES)
        proto = _quantized(proto, quantize, calibration)
    return ExportResult(Path(path), opset, inline, lowering, targets, precision, masks, table_bytes,
                        file_bytes=save(proto, path))


def export_registered(name: str, path, *, seed: int = 0, opset: Optional[int] = None, inline: bool = False,
                      lowering: str = "auto", runtimes: Optional[Sequence[str]] = None, dynamic_batch: bool = False,
                      dtype: str = "fp32", quantize: Optional[str] = None, calibration=None,
                      calibration_samples: int = precisions.DEFAULT_CALIBRATION_SAMPLES,
                      progress: Optional[Callable[[str], None]] = None, **config) -> ExportResult:
    """Build a registered reference model and export it; the metadata lets `edgeattn check` rebuild the reference.

    ``calibration`` (int8-static) is an ``.npz`` path (see :func:`precision.load_calibration`) or a list of feeds;
    by default ``calibration_samples`` inputs are drawn like the model's example inputs, with other seeds."""
    from .. import models

    _, opset, _ = _check_request(dtype, quantize, opset, runtimes, lowering)   # before the model is built
    check_writable(path)
    built = models.build(name, seed=seed, **config)
    if quantize == "int8-static":
        if isinstance(calibration, (str, Path)):
            calibration = precisions.load_calibration(calibration, list(built.inputs))
        elif calibration is None:
            calibration = calibration_feeds(built, calibration_samples)
    if progress:
        progress(f"exporting {name} -> {path} (opset {opset}, lowering {lowering}, {dtype}"
                 f"{', ' + quantize if quantize else ''}{', inlined' if inline else ''})")
    return export_onnx(built.module, list(built.inputs.values()), path, opset=opset, inline=inline,
                       lowering=lowering, runtimes=runtimes, dynamic_batch=dynamic_batch,
                       batch_axes=[built.batch_axes.get(k, 0) for k in built.inputs] if dynamic_batch else None,
                       input_names=list(built.inputs), output_names=list(built.outputs),
                       metadata_props={"model": name, "config": built.config, "seed": seed},
                       dtype=dtype, quantize=quantize, calibration=calibration)


def calibration_feeds(built, count: int = precisions.DEFAULT_CALIBRATION_SAMPLES) -> list[dict]:
    """int8-static calibration feeds for a registered model: its example inputs drawn with the next seeds."""
    from .. import models

    return [{k: v.numpy() for k, v in models.example_inputs(built.name, built.seed + 1 + i, **built.config).items()}
            for i in range(count)]


def _quantized(proto: onnx.ModelProto, mode: str, calibration) -> onnx.ModelProto:
    """Run onnxruntime's quantizer on ``proto`` (it works on files) and return the quantized model."""
    with tempfile.TemporaryDirectory(prefix="edgeattn-quantize-") as folder:
        src, dst = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(proto, str(src))
        precisions.quantize(src, dst, mode, calibration)
        quantized = onnx.load(str(dst))
    del quantized.metadata_props[:]   # the quantizer keeps them, but its own copy may lag behind: take ours
    quantized.metadata_props.extend(proto.metadata_props)
    return quantized


def _random_feeds(example_inputs, names, count: int) -> list[dict]:
    """Calibration feeds shaped like the example inputs: normal noise for float inputs, the example otherwise."""
    generator = torch.Generator().manual_seed(0)
    names = list(names) if names else [f"input_{i}" for i in range(len(example_inputs))]
    return [{n: (torch.randn(t.shape, generator=generator) if t.is_floating_point() else t).numpy()
             for n, t in zip(names, example_inputs)} for _ in range(count)]


def _check_request(dtype: str, quantize: Optional[str], opset: Optional[int], runtimes, lowering: str
                   ) -> tuple[str, int, list[str]]:
    """Validate an export request; returns the file's precision, its opset (defaulted for the dtype) and its
    target runtimes (those that can run the precision)."""
    precision = precisions.precision_name(dtype, quantize)
    opset = precisions.default_opset(dtype, DEFAULT_OPSET) if opset is None else opset
    _check_opset(opset)
    precisions.check_opset(dtype, opset)
    targets = precisions.targets_for(precision, _check_targets(runtimes), named=runtimes is not None)
    lowerings.check(lowering, opset, targets)
    return precision, opset, targets


def _check_opset(opset) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise EdgeAttnError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")


def _check_targets(runtimes) -> list[str]:
    if runtimes is None:
        return list(lowerings.ONNX_RUNTIMES)
    if isinstance(runtimes, str):
        runtimes = [runtimes]
    unknown = [r for r in runtimes if r not in lowerings.ONNX_RUNTIMES]
    if unknown or not runtimes:
        raise EdgeAttnError(f"target runtimes must be among {', '.join(lowerings.ONNX_RUNTIMES)}, got {list(runtimes)}")
    return list(dict.fromkeys(runtimes))


def finalize(proto: onnx.ModelProto, *, opset: int, inline: bool, requested: str = "auto",
             targets: Sequence[str] = (), extra: Optional[dict] = None) -> tuple[list[dict], int]:
    """Attach function bodies, dedupe tables, write metadata, optionally inline, then run the full checker.
    Returns one description per attention node and the bytes of the unique mask tables."""
    _strip_trace_metadata(proto)
    nodes = [n for n in proto.graph.node if n.domain == ONNX_DOMAIN]
    table_bytes = _dedupe_tables(proto, nodes)
    masks, overloads = [], set()
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layout, lowering = attrs["layout"].decode(), attrs["lowering"].decode()
        bias_pos = _FIRST_TABLE_INPUT + len(TABLE_INPUTS[layout]) - 1
        has_bias = len(node.input) > bias_pos and node.input[bias_pos] != ""
        del node.input[bias_pos + has_bias:]   # an absent optional bias is dropped, not passed as ""
        node.overload = functions.overload_for(lowering, has_bias)
        overloads.add(node.overload)
        # "why" documents the choice in metadata; it is not an attribute of the op
        keep = [a for a in node.attribute if a.name != "why"]
        del node.attribute[:]
        node.attribute.extend(keep)
        runs = {t: lowerings.runs_as(t, lowering, requested) for t in targets}
        masks.append({"node": node.name, "mask": attrs.get("mask", b"").decode(), "lowering": lowering,
                      "why": attrs.get("why", b"").decode(), "layout": layout,
                      "runs_as": {t: r for t, r in runs.items() if r != lowering and not inline},
                      "table_bytes": sum(table_bytes.get(i, 0) for i in node.input[_FIRST_TABLE_INPUT:])})
    for overload in sorted(overloads):
        proto.functions.append(functions.body(overload, opset))
    functions.import_domains(proto)
    # learned relative position biases reach the node through a Gather on their weight: count their index tables
    rpb_index = [i for i in proto.graph.initializer if i.name.rsplit(".", 1)[-1] == "attn_rpb_index"]
    unique_bytes = sum(table_bytes.values()) + sum(numpy_helper.to_array(i).nbytes for i in rpb_index)
    metadata.write(proto, {"version": __version__, "opset": opset, "inline": inline, "masks": masks,
                           "table_bytes": unique_bytes, **(extra or {})})
    if inline:
        inlined = onnx.inliner.inline_local_functions(proto)
        del inlined.opset_import[:]
        inlined.opset_import.extend(op for op in proto.opset_import if op.domain != ONNX_DOMAIN)
        proto.CopyFrom(inlined)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise EdgeAttnError(f"the exported model fails onnx.checker: {first_line(e)}") from e
    return masks, unique_bytes


def _strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """The exporter annotates nodes, values and the graph with ``pkg.torch.*`` metadata: each node's Python stack
    trace (source paths of the exporting machine, megabytes on large models), FX nodes, the export signature.  Keep
    only the nodes' ``namespace`` (the module path, for profiling)."""
    graph = proto.graph
    for item in [graph, *graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        keep = [p for p in item.metadata_props if not p.key.startswith("pkg.torch.")]
        del item.metadata_props[:]
        item.metadata_props.extend(keep)


def save(proto: onnx.ModelProto, path) -> int:
    """Write ``proto`` to ``path`` through a temporary file in the same folder, so a failure leaves the old file."""
    if proto.ByteSize() >= 2**31 - 1:
        raise EdgeAttnError(f"model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit")
    return atomic_write(path, proto.SerializeToString())


def _dedupe_tables(proto: onnx.ModelProto, nodes) -> dict[str, int]:
    """Point attention nodes that carry byte-identical tables at one initializer; return name -> bytes kept."""
    inits = {i.name: i for i in proto.graph.initializer}
    first_by_digest, kept, dropped = {}, {}, set()
    for node in nodes:
        for pos in range(_FIRST_TABLE_INPUT, len(node.input)):
            name = node.input[pos]
            if name not in inits:
                continue
            array = numpy_helper.to_array(inits[name])
            digest = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
            first = first_by_digest.setdefault(digest, name)
            if first != name:
                node.input[pos] = first
                dropped.add(name)
            else:
                kept[name] = array.nbytes
    still_used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name not in dropped or i.name in still_used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return kept


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and warnings on every call; a CLI shows its own progress instead."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        sink = io.StringIO()  # errors still surface as exceptions
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
