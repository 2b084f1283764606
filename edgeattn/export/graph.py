"""The traced graph -> the file's graph: each attention node gets its planned body, identical tables are stored once,
the exporter's trace metadata goes, edgeattn's metadata comes in, the exact rewrites of :mod:`.simplify` apply, and
the result passes onnx's full checker.

By default the bodies are inlined: the file holds standard ops only, which every runtime and converter reads without
edgeattn.  ``custom_op`` keeps each attention node as an ``edgeattn`` op with its body as a model-local function
(onnxruntime expands it; edgeattn's OpenVINO runtime converts dense-table nodes to its own attention op)."""

from __future__ import annotations

import hashlib
from typing import Optional

import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from .. import onnxfile, runtimes
from ..errors import EdgeAttnError, first_line
from ..onnxfile import LOWERINGS, bodies
from ..signature import DECISION, DECISION_TOP_K, DOMAIN
from ..version import __version__
from . import simplify
from .plan import Plan
from .request import ExportRequest


def finalize(
    proto: onnx.ModelProto, request: ExportRequest, plan: Plan, extra: Optional[dict] = None
) -> tuple[list[dict], int]:
    """Give every attention node its planned body, dedupe tables, write metadata, then run the full checker.  This
    is the custom-op form: the exporter quantizes it (attention stays float), then expands it with :func:`inline`
    unless asked not to.  Returns one description per attention node and the bytes of the unique mask tables."""
    _strip_trace_metadata(proto)
    decisions = _decisions(proto.graph)
    nodes = onnxfile.attention_nodes(proto)
    choices = [plan.choice_for(node) for node in nodes]  # by table names, before dedupe renames them
    table_bytes = _dedupe_tables(proto, nodes)
    masks, op_types = [], set()
    initializers = {i.name for i in proto.graph.initializer}
    for node, choice in zip(nodes, choices):
        attrs = onnxfile.attributes(node)
        layout = attrs["layout"]
        if LOWERINGS[choice.lowering].layout != layout:  # a plan that does not fit its node is our bug
            raise EdgeAttnError(
                f"internal error: node {node.name} has a {layout} table, its plan says "
                f"{choice.lowering}; please report this"
            )
        bias, softcap = onnxfile.has_bias(node, layout), onnxfile.softcap(node)
        if softcap and not LOWERINGS[choice.lowering].softcap:
            raise EdgeAttnError(
                f"attention {attrs.get('mask') or node.name} soft-caps its scores (softcap "
                f"{softcap:g}); the {choice.lowering} lowering cannot (onnxruntime's "
                f"MultiHeadAttention has no softcap): use --lowering auto, dense, blocked or attention"
            )
        del node.input[onnxfile.bias_position(layout) + bias :]  # an absent optional bias is dropped, not ""
        node.attribute.append(helper.make_attribute("lowering", choice.lowering))
        node.op_type = onnxfile.op_type(choice.lowering, bias, softcap > 0)
        op_types.add(node.op_type)
        runs = {t: runtimes.get(t).executes(choice.lowering, request.lowering, softcap > 0) for t in request.targets}
        masks.append(
            {
                "node": node.name,
                "mask": attrs.get("mask", ""),
                "lowering": choice.lowering,
                **({"softcap": softcap} if softcap else {}),
                "why": choice.reason,
                "layout": layout,
                "runs_as": {t: r for t, r in runs.items() if r != choice.lowering and request.custom_op},
                "table_bytes": sum(table_bytes.get(i, 0) for i in onnxfile.table_inputs(node)),
                **_table_entry(node, layout, choice, initializers),
            }
        )
    for name in sorted(op_types):
        proto.functions.append(bodies.body(name, request.opset))
    bodies.import_domains(proto)
    for op in proto.opset_import:  # the lowest node version that says what the nodes do (see edgeattn.onnxfile)
        if op.domain == DOMAIN:
            op.version = onnxfile.op_version(proto)
    # learned relative position biases reach the node through a Gather on their weight: count their index tables
    rpb_index = [i for i in proto.graph.initializer if i.name.rsplit(".", 1)[-1] == "attn_rpb_index"]
    unique_bytes = sum(table_bytes.values()) + sum(numpy_helper.to_array(i).nbytes for i in rpb_index)
    onnxfile.write_metadata(
        proto,
        {
            "version": __version__,
            "opset": request.opset,
            "inline": not request.custom_op,
            "masks": masks,
            "table_bytes": unique_bytes,
            "lowering": request.lowering,
            "targets": list(request.targets),
            "dynamic_batch": request.dynamic_batch,
            "precision": request.precision,
            "format": request.format,
            **({"decisions": decisions} if decisions else {}),
            **(extra or {}),
        },
    )
    bodies.tensor_constants(proto.graph)
    simplify.fusable_gelu(proto)
    _check(proto)
    return masks, unique_bytes


def _table_entry(node: onnx.NodeProto, layout: str, choice, initializers: set[str]) -> dict:
    """Where the node's static table is in the file: its initializers' names by role (``mask``, ``bank``...) and
    the token counts it was built for.  Inlining removes the node but keeps these names, so `inspect --plot` reads
    the tables of either form.  A mask computed in the graph has none."""
    names = dict(zip(onnxfile.TABLE_INPUTS[layout], onnxfile.table_inputs(node)))
    found = {role: name for role, name in names.items() if name in initializers}
    if choice.table is None or not found:
        return {}
    return {"tables": found, "q_len": choice.table.shape.q_len, "kv_len": choice.table.shape.kv_len}


def _decisions(graph: onnx.GraphProto) -> list[dict]:
    """Replace each declared decision by ``Less(value, threshold)`` and each declared selection by ``TopK`` (largest,
    sorted: equal values go to the lower index); return what parity needs to read them back: the compared tensor's
    name, the threshold (or the selection's count) and the decision's name, in graph (= call) order."""
    found, nodes = [], []
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in (DECISION, DECISION_TOP_K):
            attrs = onnxfile.attributes(node)
            if node.op_type == DECISION:
                threshold = f"{node.output[0]}_threshold"
                nodes.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [threshold],
                        value=helper.make_tensor(threshold, attrs["dtype"], [], [attrs["threshold"]]),
                    )
                )
                found.append({"name": attrs["name"], "tensor": node.input[0], "threshold": attrs["threshold"]})
                node = helper.make_node("Less", [node.input[0], threshold], list(node.output), name=node.name)
            else:
                count = f"{node.output[0]}_count"
                nodes.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [count],
                        value=helper.make_tensor(count, onnx.TensorProto.INT64, [1], [attrs["count"]]),
                    )
                )
                found.append({"name": attrs["name"], "tensor": node.input[0], "top_k": attrs["count"]})
                node = helper.make_node(
                    "TopK", [node.input[0], count], list(node.output), name=node.name, axis=-1, largest=1, sorted=1
                )
        nodes.append(onnx.NodeProto())
        nodes[-1].CopyFrom(node)  # a copy: clearing the graph's list below would take its nodes along
    if found:
        del graph.node[:]
        graph.node.extend(nodes)
    return found


def inline(proto: onnx.ModelProto) -> None:
    """Expand every attention node into its body (standard ops only, constants as tensors), drop the ``edgeattn``
    opset import and the bodies' row-zeroing where the table has no empty row (:mod:`.simplify`)."""
    inlined = onnx.inliner.inline_local_functions(proto)
    del inlined.opset_import[:]
    inlined.opset_import.extend(op for op in proto.opset_import if op.domain != DOMAIN)
    proto.CopyFrom(inlined)
    bodies.tensor_constants(proto.graph)
    simplify.drop_constant_where(proto)
    _check(proto)


def _check(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise EdgeAttnError(f"the exported model fails onnx.checker: {first_line(e)}") from e


def _strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """The exporter annotates nodes, values and the graph with ``pkg.torch.*`` metadata: each node's Python stack
    trace (source paths of the exporting machine, megabytes on large models), FX nodes, the export signature.  Keep
    only the nodes' ``namespace`` (the module path, for profiling)."""
    graph = proto.graph
    for item in [graph, *graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        keep = [p for p in item.metadata_props if not p.key.startswith("pkg.torch.")]
        del item.metadata_props[:]
        item.metadata_props.extend(keep)


def _dedupe_tables(proto: onnx.ModelProto, nodes) -> dict[str, int]:
    """Point attention nodes that carry byte-identical tables at one initializer; return name -> bytes kept."""
    inits = {i.name: i for i in proto.graph.initializer}
    first_by_digest, kept, dropped = {}, {}, set()
    first_table = len(onnxfile.QKV)
    for node in nodes:
        for pos in range(first_table, len(node.input)):
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
