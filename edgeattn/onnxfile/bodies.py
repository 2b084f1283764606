"""Standard-op bodies for ``edgeattn.MaskedAttention``, written as ONNX model-local functions: the op's definition.

Each body is its own op type (``MaskedAttention_dense_bias``...: :data:`edgeattn.onnxfile.OP_TYPES`) with a function
of that name; onnxruntime expands the function itself, ``onnx.inliner`` expands it for everything else.  Constants
are tensor ``value``s (older converters read no other Constant form), except the softmax scale and the softcap, which
refer to the node's ``scale`` and ``softcap`` attributes until the body is inlined (:func:`tensor_constants` then
rewrites them).  A ``softcap_nodes`` body caps the scaled scores, ``softcap * tanh(s / softcap)``, right after their
MatMul, before bias and mask (the Attention op does the same with its own ``softcap`` attribute).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import FunctionProto, TensorProto, helper, numpy_helper

from ..errors import EdgeAttnError, InvalidArgument
from . import DOMAIN, LOWERINGS, OP_TYPES, attention_nodes, attributes, op_type
from .nodes import (
    cast,
    dense_nodes,
    from_attribute,
    function,
    ints,
    scaled_q,
    softcap_nodes,
    softmax,
    zero_rows,
    zero_rows_prologue,
)
from .routed import routed, routed_dense


def dense(opset: int, name: str) -> FunctionProto:
    """MatMul / Add / Softmax / MatMul over a dense boolean table.

    The table becomes an additive 0 / -inf mask (exact in every float dtype); a row with no allowed key then
    softmaxes to NaN, and the last Where turns exactly those rows to zeros, matching torch.
    """
    _, bias, cap = OP_TYPES[name]
    return function(name, opset, dense_nodes(opset, bias, cap), dense.__doc__)


def blocked(opset: int, name: str) -> FunctionProto:
    """Per query tile: Gather its keys, batched MatMul, add the tile's bank block, Softmax, MatMul, Gather back.

    Every tile scores only the keys its block table lists (a compact region for grid masks), so the work is
    the mask's plus the tile padding; the bank and indices are static and runtimes constant-fold the masks.
    """
    _, bias, cap = OP_TYPES[name]
    n = helper.make_node
    nodes = [
        *scaled_q(),
        n("Gather", ["q_scaled", "q_index"], ["q_tiles"], axis=2),  # (B, H, T, tq, D)
        n("Gather", ["k", "kv_index"], ["k_tiles"], axis=2),  # (B, H, T, K, D)
        n("Gather", ["v", "kv_index"], ["v_tiles"], axis=2),
        n("Transpose", ["k_tiles"], ["k_tiles_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q_tiles", "k_tiles_t"], ["scores"]),  # (B, H, T, tq, K)
        *(softcap_nodes("scores", "capped") if cap else []),
        n("Gather", ["bank", "block"], ["blocks_t"], axis=0),  # (T, heads or 1, tq, K)
        n("Transpose", ["blocks_t"], ["mask"], perm=[1, 0, 2, 3]),  # (heads or 1, T, tq, K)
        *zero_rows_prologue(),
        n("Where", ["mask", "zero", "neg_inf"], ["mask_add"]),
    ]
    if bias:
        nodes += [
            n("Gather", ["bank_bias", "block"], ["bias_blocks_t"], axis=0),
            n("Transpose", ["bias_blocks_t"], ["bias_blocks"], perm=[1, 0, 2, 3]),
            cast("bias_blocks", "bias_t"),
            n("Add", ["bias_t", "mask_add"], ["bias_add"]),
        ]
    nodes += [
        n("Add", ["capped" if cap else "scores", "bias_add" if bias else "mask_add"], ["masked"]),
        *softmax("masked", "probs"),
        n("MatMul", ["probs", "v_tiles"], ["attended"]),  # (B, H, T, tq, Dv)
        *zero_rows(opset, "attended", "attended_0"),
        # (B, H, T*tq, Dv): B and H from q, Dv from v
        n("Shape", ["q"], ["batch_heads"], start=0, end=2),
        n("Shape", ["v"], ["head_dim"], start=3, end=4),
        ints("minus_one", [-1]),
        n("Concat", ["batch_heads", "minus_one", "head_dim"], ["flat_shape"], axis=0),
        n("Reshape", ["attended_0", "flat_shape"], ["flat"]),
        n("Gather", ["flat", "q_pos"], ["out"], axis=2),  # back to query order
    ]
    return function(name, opset, nodes, blocked.__doc__)


def attention(opset: int, name: str) -> FunctionProto:
    """One ONNX ``Attention`` node (opset >= 23) with the boolean table (or bias and -inf) as ``attn_mask``.

    Its ``softcap`` caps the scaled scores before adding ``attn_mask``, as edgeattn does (onnxruntime 1.32 and
    OpenVINO 2026.4 both compute it so; tests/test_softcap.py checks them)."""
    _, bias, cap = OP_TYPES[name]
    n = helper.make_node
    nodes = zero_rows_prologue()
    if bias:
        nodes += [cast("bias", "bias_t"), n("Where", ["mask", "bias_t", "neg_inf"], ["attn_mask"])]
    attend = from_attribute(
        n(
            "Attention",
            ["q", "k", "v", "attn_mask" if bias else "mask"],
            ["attended"],
            scale=1.0,
            softmax_precision=TensorProto.FLOAT,
            softcap=1.0 if cap else None,
        ),
        "scale",
        "scale",
    )
    if cap:
        from_attribute(attend, "softcap", "softcap")
    nodes += [attend, *zero_rows(opset, "attended", "out")]
    return function(name, opset, nodes, attention.__doc__)


def contrib(opset: int, name: str) -> FunctionProto:
    """onnxruntime's ``com.microsoft.MultiHeadAttention`` with the table as an additive ``attention_bias``.

    The query goes in as (B, N, H*D), keys and values stay (B, H, N, D); the output comes back as (B, H, N, Dv).
    """
    bias = OP_TYPES[name][1]
    n = helper.make_node
    nodes = zero_rows_prologue() + [n("Where", ["mask", "zero", "neg_inf"], ["mask_add"])]
    if bias:
        nodes += [cast("bias", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    nodes += [
        # attention_bias must be 4-D (B or 1, H or 1, Nq, Nkv): a static table gets a leading 1, a mask computed
        # in the graph may already carry the batch
        n("Shape", ["bias_add" if bias else "mask_add"], ["bias_tail"], start=-3),
        ints("minus_one_1", [-1]),
        n("Concat", ["minus_one_1", "bias_tail"], ["bias_4d"], axis=0),
        n("Reshape", ["bias_add" if bias else "mask_add", "bias_4d"], ["attention_bias"]),
        n("Transpose", ["q"], ["q_bsnh"], perm=[0, 2, 1, 3]),
        ints("bsh", [0, 0, -1]),
        n("Reshape", ["q_bsnh", "bsh"], ["query"]),
        from_attribute(
            from_attribute(
                n(
                    "MultiHeadAttention",
                    ["query", "k", "v", "", "", "attention_bias"],
                    ["attended_bsh"],
                    domain="com.microsoft",
                    num_heads=1,
                    scale=1.0,
                ),
                "heads",
                "num_heads",
            ),
            "scale",
            "scale",
        ),
        n("Shape", ["q"], ["heads_dim"], start=1, end=2),
        ints("zero_zero", [0, 0]),
        ints("minus_one", [-1]),
        n("Concat", ["zero_zero", "heads_dim", "minus_one"], ["bsnh"], axis=0),
        n("Reshape", ["attended_bsh", "bsnh"], ["attended_bsnh"]),
        n("Transpose", ["attended_bsnh"], ["attended"], perm=[0, 2, 1, 3]),
        *zero_rows(opset, "attended", "out"),
    ]
    return function(name, opset, nodes, contrib.__doc__, extra_opsets={"com.microsoft": 1})


BODIES = {
    "dense": dense,
    "blocked": blocked,
    "attention": attention,
    "contrib": contrib,
    "routed": routed,
    "routed_dense": routed_dense,
}


def body(name: str, opset: int) -> FunctionProto:
    """The function of op type ``name`` (a key of :data:`OP_TYPES`)."""
    if name not in OP_TYPES:
        raise InvalidArgument(f"unknown attention op type {name!r}; known: {', '.join(OP_TYPES)}")
    return BODIES[OP_TYPES[name][0]](opset, name)


def swap(model: onnx.ModelProto, runs_as: Callable[[str, bool], str], opset: int) -> onnx.ModelProto:
    """Give each attention node the body ``runs_as(its lowering, whether it soft-caps)`` names (in memory), adding
    missing bodies."""
    swapped = set()
    for node in attention_nodes(model):
        lowering = attributes(node).get("lowering")
        _, bias, cap = OP_TYPES[node.op_type]
        target = runs_as(lowering, cap) if lowering else None
        if target and target != lowering and target in LOWERINGS:
            if cap and not LOWERINGS[target].softcap:  # Runtime.executes never asks this; a body must not drop it
                raise EdgeAttnError(
                    f"internal error: node {node.name} soft-caps its scores, the {target} body "
                    f"cannot; please report this"
                )
            node.op_type = op_type(target, bias, cap)
            swapped.add(node.op_type)
    have = {f.name for f in model.functions if f.domain == DOMAIN}
    for name in sorted(swapped - have):
        model.functions.append(body(name, opset))
    import_domains(model)
    return model


def import_domains(model) -> None:
    """Add the opset imports the model's functions use (contrib bodies use ``com.microsoft``)."""
    used = {op.domain for f in model.functions for op in f.opset_import}
    have = {op.domain for op in model.opset_import}
    model.opset_import.extend(helper.make_opsetid(d, 1) for d in sorted(used - have))


# Constant attributes that hold a value directly, and the tensor each becomes
_CONSTANT_FORMS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def tensor_constants(graph: onnx.GraphProto) -> None:
    """Rewrite every ``Constant(value_float / value_floats / value_int / value_ints)`` of ``graph`` (and its
    subgraphs) as ``Constant(value=tensor)``, the one form every converter reads (onnxsim 0.4.36 and onnx2tf read no
    other)."""
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                tensor_constants(sub)
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        form = next((a for a in node.attribute if a.name in _CONSTANT_FORMS and not a.ref_attr_name), None)
        if form is not None:
            value = np.array(helper.get_attribute_value(form), _CONSTANT_FORMS[form.name])
            node.attribute.remove(form)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value, node.output[0])))
