"""The edgeattn ONNX file format, in one place: the ``edgeattn.MaskedAttention`` node (inputs, attributes, the
lowerings its body can be), the file's ``edgeattn.*`` metadata, and reading and writing files safely.

Export writes through this module; runtimes, parity, inspection and bench read through it.  It imports neither torch
nor the exporter, so a runtime that only runs files depends on nothing else of edgeattn.

The node: ``MaskedAttention_<body>(q, k, v, *table)`` in domain ``edgeattn``, version 2 or 3.  q, k, v are
(B, H, N, D); the table's tensors follow in the order :data:`TABLE_INPUTS` gives for its ``layout`` attribute, the
optional additive bias last (an absent bias is dropped, not passed as "").  Each body (``dense``, ``dense_bias``,
``blocked_softcap``...: its ``lowering``, with or without soft-capping and bias) is its own op type with a model-local
function of that name, see :mod:`edgeattn.onnxfile.bodies`.  (Version 1 named bodies by function *overloads*, which
converters drop or merge.)  Version 3 added the ``softcap`` attribute and its bodies; a file is written at the
lowest version its nodes need (:func:`op_version`), so an edgeattn that knows only version 2 still reads files
without soft-capping and refuses, in one line, those with it (it would run a softcapped node as OpenVINO's SDPA,
without the cap).

Only files exported with ``--custom-op`` keep these nodes; the default file holds their bodies inlined, standard
ops only, so that every runtime and converter reads it without edgeattn.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import BadFile, ExportFailed, first_line
from ..files import atomic_write
from ..signature import DOMAIN, OLDEST_OP_VERSION, OP, OP_VERSION, QKV, SOFTCAP_OP_VERSION, TABLE_INPUTS


@dataclass(frozen=True)
class Lowering:
    """A body an attention node can have: the table layout it reads, the opset it needs, and whether it can
    soft-cap the scores and add a bias."""

    name: str
    layout: str
    min_opset: int = 17
    doc: str = ""
    softcap: bool = True
    bias: bool = True


LOWERINGS = {
    low.name: low
    for low in (
        Lowering("dense", "dense", doc="MatMul / Add / Softmax / MatMul over the whole table"),
        Lowering("blocked", "blocked", doc="per query tile: Gather its keys, batched MatMul, bank mask, Softmax"),
        Lowering("attention", "dense", min_opset=23, doc="the ONNX Attention op with the dense mask"),
        Lowering(
            "contrib", "dense", doc="onnxruntime's com.microsoft.MultiHeadAttention with attention_bias", softcap=False
        ),  # MultiHeadAttention has no softcap
        Lowering(
            "routed",
            "routed",
            doc="queries grouped by the key block they chose: Scatter / Gather, batched MatMul, "
            "softmax statistics merged per query",
            softcap=False,
            bias=False,
        ),
        Lowering(
            "routed_dense",
            "routed",
            doc="the routed blocks as a dense mask: MatMul / Add / Softmax / MatMul over all keys",
            softcap=False,
            bias=False,
        ),
    )
}


def op_type(lowering: str, has_bias: bool, softcap: bool = False) -> str:
    """The op type (and function name) of a node with body ``lowering``: ``MaskedAttention_dense_bias``,
    ``MaskedAttention_blocked_softcap``..."""
    return f"{OP}_{lowering}{'_softcap' if softcap else ''}{'_bias' if has_bias else ''}"


# op type -> (lowering, has_bias, softcap)
OP_TYPES = {
    op_type(low.name, bias, cap): (low.name, bias, cap)
    for low in LOWERINGS.values()
    for cap in ((False, True) if low.softcap else (False,))
    for bias in ((False, True) if low.bias else (False,))
}


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type.startswith(OP)]


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as Python values (strings decoded)."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def bias_position(layout: str) -> int:
    """Input position of the optional bias of a node with a table of ``layout``."""
    return len(QKV) + len(TABLE_INPUTS[layout]) - 1


def softcap(node: onnx.NodeProto) -> float:
    """The node's softcap, 0.0 for none (read alone: :func:`attributes` decodes strings a damaged file may not hold)."""
    return next((float(a.f) for a in node.attribute if a.name == "softcap"), 0.0)


def op_version(model: onnx.ModelProto) -> int:
    """The lowest node version that expresses every attention node of ``model``."""
    return SOFTCAP_OP_VERSION if any(softcap(n) for n in attention_nodes(model)) else OLDEST_OP_VERSION


def has_bias(node: onnx.NodeProto, layout: Optional[str] = None) -> bool:
    position = bias_position(layout or attributes(node)["layout"])
    return len(node.input) > position and node.input[position] != ""


def table_inputs(node: onnx.NodeProto) -> list[str]:
    """Names of the node's table tensors (and bias), after q, k, v."""
    return list(node.input[len(QKV) :])


# ---- metadata: what a file says about itself, in metadata_props under edgeattn.* keys ----

METADATA_PREFIX = "edgeattn."
# written by export itself; a user's metadata_props may not set them
RESERVED_METADATA = (
    "version",
    "opset",
    "inline",
    "masks",
    "table_bytes",
    "lowering",
    "targets",
    "dynamic_batch",
    "precision",
    "format",
    "decisions",
)


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as stored: strings as they are, everything else as sorted JSON (reproducible exports)."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in sorted(values.items())}


def decode_metadata(stored: Mapping[str, str]) -> dict[str, Any]:
    """Stored metadata values, JSON-decoded where they are JSON."""
    out = {}
    for key, text in stored.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def write_metadata(model: onnx.ModelProto, values: Mapping[str, Any]) -> None:
    """Set ``edgeattn.<key>`` entries of an ONNX model."""
    existing = {p.key: p for p in model.metadata_props}
    for key, text in encode_metadata(values).items():
        prop = existing.get(METADATA_PREFIX + key) or model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, text


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``edgeattn.*`` entries of an ONNX model."""
    return strip_prefix({p.key: p.value for p in model.metadata_props})


def strip_prefix(props: Mapping[str, str]) -> dict[str, Any]:
    """The decoded ``edgeattn.*`` entries of a key -> value map, without the prefix."""
    return decode_metadata({k[len(METADATA_PREFIX) :]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)})


@dataclass(frozen=True)
class Contents:
    """What a runtime must support to run a file (or a file an export will write): its precision, the lowerings its
    nodes have, the lowering asked for at export (``auto`` lets a runtime swap dense-table bodies) and its format
    (onnx, openvino, ort: see :mod:`edgeattn.onnxfile.formats`)."""

    precision: str = "fp32"
    lowerings: frozenset = frozenset()
    requested: str = "auto"
    format: str = "onnx"

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> "Contents":
        return cls(
            metadata.get("precision", "fp32"),
            frozenset(m.get("lowering", "") for m in metadata.get("masks", [])) - {""},
            metadata.get("lowering", "auto"),
            metadata.get("format", "onnx"),
        )


# ---- reading and writing files ----


def read(path, weights: bool = False) -> onnx.ModelProto:
    """Load an ONNX file or say in one line why it cannot be used.

    ``weights=True`` also loads tensors stored as external data (``torch.onnx.export`` writes ``model.onnx.data``
    beside the file); their locations must be files inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise BadFile(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise BadFile(
            f"{path}: not an ONNX model, or truncated/corrupted (could not parse it as an ONNX protobuf)"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise BadFile(f"{path}: not an ONNX model (no graph in the file)")
    for op in model.opset_import:
        if op.domain == DOMAIN and op.version > OP_VERSION:
            raise BadFile(
                f"{path}: uses {DOMAIN} opset {op.version}, this edgeattn knows up to "
                f"{OP_VERSION}; upgrade edgeattn or re-export the file"
            )
        if op.domain == DOMAIN and op.version < OLDEST_OP_VERSION:
            raise BadFile(
                f"{path}: uses {DOMAIN} opset {op.version}, written by an older edgeattn (its "
                f"attention bodies are function overloads, which converters drop); re-export it"
            )
    _check_nodes(model, path)
    check_external_data(model, path)  # even when not loading it: a file pointing elsewhere is refused everywhere
    if weights:
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as e:
            raise BadFile(f"{path}: could not read its external data: {first_line(e)}") from e
    return model


def _check_nodes(model: onnx.ModelProto, path: Path) -> None:
    """Every attention node has a known op type, and a softcap exactly when its op type (its body) applies one:
    runtimes read the attribute to choose how to run a node, the body computes it, and the two must agree."""
    for node in attention_nodes(model):
        if node.op_type not in OP_TYPES:
            raise BadFile(
                f"{path}: attention node {node.name!r} has the unknown op type {node.op_type!r} "
                f"(known: {', '.join(OP_TYPES)}); upgrade edgeattn or re-export the file"
            )
        if OP_TYPES[node.op_type][2] != (softcap(node) > 0):
            raise BadFile(
                f"{path}: attention node {node.name!r} ({node.op_type}) has softcap "
                f"{softcap(node):g}, which its op type contradicts; re-export the file"
            )


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data location must be a relative path to an existing file inside the model's folder
    (after resolving ``..`` and symlinks): a model from elsewhere must not make us read other files."""
    folder = Path(path).resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents or not target.is_file():
            raise BadFile(
                f"{path}: tensor {tensor.name!r} points at external data {location!r}, which is not "
                f"a file inside {folder}; keep the .onnx and its data file together"
            )


def save(model: onnx.ModelProto, path) -> int:
    """Write ``model`` to ``path`` through a temporary file in the same folder, so a failure leaves the old file.
    Returns the bytes written."""
    if model.ByteSize() >= 2**31 - 1:
        raise ExportFailed(f"model is {model.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit")
    return atomic_write(path, model.SerializeToString())


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints for static axes, names for symbolic ones
    dtype: np.dtype


def io_info(values: Sequence[onnx.ValueInfoProto]) -> list[TensorInfo]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        out.append(TensorInfo(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return out


def graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """The model's inputs a caller feeds (initializers listed as graph inputs excluded)."""
    initializers = {i.name for i in model.graph.initializer}
    return io_info([v for v in model.graph.input if v.name not in initializers])


def graph_outputs(model: onnx.ModelProto) -> list[TensorInfo]:
    return io_info(model.graph.output)


def mask_label(node: Mapping) -> str:
    """An attention node's mask name (its ``masks`` metadata entry) as people read it.  A mask the model computes
    from its inputs (Mask2Former's) usually has no name: say so rather than print an empty one."""
    if node.get("mask"):
        return node["mask"]
    # no table bytes: nothing of the mask is stored, so the graph computes it (old files may not say)
    return "<computed in the graph>" if node.get("table_bytes") == 0 else "<unnamed>"


def attention_lines(nodes: Sequence[Mapping]) -> list[str]:
    """One line per distinct (mask, lowering, softcap, why, runs_as) of a file's ``masks`` metadata (what ``check``
    and ``inspect`` print): ``  window_7 x2: blocked, softcap 50 (why); openvino-cpu runs dense``."""
    counts = Counter(
        (
            mask_label(m),
            m.get("lowering", "?"),
            m.get("softcap"),
            m.get("why", ""),
            ", ".join(f"{rt} runs {how}" for rt, how in m.get("runs_as", {}).items()),
        )
        for m in nodes
    )
    return [
        f"  {mask} x{n}: {low}"
        + (f", softcap {cap:g}" if cap else "")
        + (f" ({why})" if why else "")
        + (f"; {runs}" if runs else "")
        for (mask, low, cap, why, runs), n in counts.items()
    ]
