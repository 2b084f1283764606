"""Standard-op bodies for ``edgeattn.MaskedAttention``, written as ONNX model-local functions: the op's definition.

Each body is its own op type (``MaskedAttention_dense_bias``...: :data:`edgeattn.onnxfile.OP_TYPES`) with a function
of that name; onnxruntime expands the function itself, ``onnx.inliner`` expands it for everything else.  Constants
are tensor ``value``s (older converters read no other Constant form), except the softmax scale and the softcap, which
refer to the node's ``scale`` and ``softcap`` attributes until the body is inlined (:func:`tensor_constants` then
rewrites them).  A ``_softcap`` body caps the scaled scores, ``softcap * tanh(s / softcap)``, right after their
MatMul, before bias and mask (the Attention op does the same with its own ``softcap`` attribute).
"""
from __future__ import annotations

from typing import Callable, Optional

import onnx
import numpy as np
from onnx import FunctionProto, TensorProto, helper, numpy_helper

from ..errors import EdgeAttnError
from . import ATTRIBUTES, DOMAIN, LOWERINGS, OP_TYPES, QKV, TABLE_INPUTS, attention_nodes, attributes, op_type


def dense(opset: int, name: str) -> FunctionProto:
    """MatMul / Add / Softmax / MatMul over a dense boolean table.

    The table becomes an additive 0 / -inf mask (exact in every float dtype); a row with no allowed key then
    softmaxes to NaN, and the last Where turns exactly those rows to zeros, matching torch.
    """
    _, bias, cap = OP_TYPES[name]
    return _function(name, opset, dense_nodes(opset, bias, cap), dense.__doc__)


def dense_nodes(opset: int, bias: bool, cap: bool) -> list:
    """The dense body's nodes: q, k, v and a boolean ``mask`` (and ``bias``) -> ``out``."""
    n = helper.make_node
    nodes = [
        *_scaled_q(),
        n("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_scaled", "k_t"], ["scores"]),
        *(_softcap("scores", "capped") if cap else []),
    ]
    nodes += _zero_rows_prologue() + [
        # The additive mask is computed on the (heads or 1, Nq, Nkv) table, not on the (B, H, Nq, Nkv) scores:
        # runtimes constant-fold it for static tables, and one broadcast Add is much faster than a broadcast Where.
        n("Where", ["mask", "zero", "neg_inf"], ["mask_add"]),
    ]
    if bias:
        nodes += [_cast("bias", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    return nodes + [
        n("Add", ["capped" if cap else "scores", "bias_add" if bias else "mask_add"], ["masked"]),
        *_softmax("masked", "probs"),
        n("MatMul", ["probs", "v"], ["attended"]),
        *_zero_rows(opset, "attended", "out"),
    ]


def blocked(opset: int, name: str) -> FunctionProto:
    """Per query tile: Gather its keys, batched MatMul, add the tile's bank block, Softmax, MatMul, Gather back.

    Every tile scores only the keys its block table lists (a compact region for grid masks), so the work is
    the mask's plus the tile padding; the bank and indices are static and runtimes constant-fold the masks.
    """
    _, bias, cap = OP_TYPES[name]
    n = helper.make_node
    nodes = [
        *_scaled_q(),
        n("Gather", ["q_scaled", "q_index"], ["q_tiles"], axis=2),        # (B, H, T, tq, D)
        n("Gather", ["k", "kv_index"], ["k_tiles"], axis=2),              # (B, H, T, K, D)
        n("Gather", ["v", "kv_index"], ["v_tiles"], axis=2),
        n("Transpose", ["k_tiles"], ["k_tiles_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q_tiles", "k_tiles_t"], ["scores"]),                 # (B, H, T, tq, K)
        *(_softcap("scores", "capped") if cap else []),
        n("Gather", ["bank", "block"], ["blocks_t"], axis=0),             # (T, heads or 1, tq, K)
        n("Transpose", ["blocks_t"], ["mask"], perm=[1, 0, 2, 3]),        # (heads or 1, T, tq, K)
        *_zero_rows_prologue(),
        n("Where", ["mask", "zero", "neg_inf"], ["mask_add"]),
    ]
    if bias:
        nodes += [n("Gather", ["bank_bias", "block"], ["bias_blocks_t"], axis=0),
                  n("Transpose", ["bias_blocks_t"], ["bias_blocks"], perm=[1, 0, 2, 3]),
                  _cast("bias_blocks", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    nodes += [
        n("Add", ["capped" if cap else "scores", "bias_add" if bias else "mask_add"], ["masked"]),
        *_softmax("masked", "probs"),
        n("MatMul", ["probs", "v_tiles"], ["attended"]),                   # (B, H, T, tq, Dv)
        *_zero_rows(opset, "attended", "attended_0"),
        # (B, H, T*tq, Dv): B and H from q, Dv from v
        n("Shape", ["q"], ["batch_heads"], start=0, end=2),
        n("Shape", ["v"], ["head_dim"], start=3, end=4),
        _ints("minus_one", [-1]),
        n("Concat", ["batch_heads", "minus_one", "head_dim"], ["flat_shape"], axis=0),
        n("Reshape", ["attended_0", "flat_shape"], ["flat"]),
        n("Gather", ["flat", "q_pos"], ["out"], axis=2),                  # back to query order
    ]
    return _function(name, opset, nodes, blocked.__doc__)


def attention(opset: int, name: str) -> FunctionProto:
    """One ONNX ``Attention`` node (opset >= 23) with the boolean table (or bias and -inf) as ``attn_mask``.

    Its ``softcap`` caps the scaled scores before adding ``attn_mask``, as edgeattn does (onnxruntime 1.32 and
    OpenVINO 2026.4 both compute it so; tests/test_softcap.py checks them)."""
    _, bias, cap = OP_TYPES[name]
    n = helper.make_node
    nodes = _zero_rows_prologue()
    if bias:
        nodes += [_cast("bias", "bias_t"), n("Where", ["mask", "bias_t", "neg_inf"], ["attn_mask"])]
    attend = _from_attribute(n("Attention", ["q", "k", "v", "attn_mask" if bias else "mask"], ["attended"], scale=1.0,
                               softmax_precision=TensorProto.FLOAT, softcap=1.0 if cap else None), "scale", "scale")
    if cap:
        _from_attribute(attend, "softcap", "softcap")
    nodes += [attend, *_zero_rows(opset, "attended", "out")]
    return _function(name, opset, nodes, attention.__doc__)


def contrib(opset: int, name: str) -> FunctionProto:
    """onnxruntime's ``com.microsoft.MultiHeadAttention`` with the table as an additive ``attention_bias``.

    The query goes in as (B, N, H*D), keys and values stay (B, H, N, D); the output comes back as (B, H, N, Dv).
    """
    bias = OP_TYPES[name][1]
    n = helper.make_node
    nodes = _zero_rows_prologue() + [n("Where", ["mask", "zero", "neg_inf"], ["mask_add"])]
    if bias:
        nodes += [_cast("bias", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    nodes += [
        # attention_bias must be 4-D (B or 1, H or 1, Nq, Nkv): a static table gets a leading 1, a mask computed
        # in the graph may already carry the batch
        n("Shape", ["bias_add" if bias else "mask_add"], ["bias_tail"], start=-3),
        _ints("minus_one_1", [-1]),
        n("Concat", ["minus_one_1", "bias_tail"], ["bias_4d"], axis=0),
        n("Reshape", ["bias_add" if bias else "mask_add", "bias_4d"], ["attention_bias"]),
        n("Transpose", ["q"], ["q_bsnh"], perm=[0, 2, 1, 3]),
        _ints("bsh", [0, 0, -1]),
        n("Reshape", ["q_bsnh", "bsh"], ["query"]),
        _from_attribute(_from_attribute(
            n("MultiHeadAttention", ["query", "k", "v", "", "", "attention_bias"], ["attended_bsh"],
              domain="com.microsoft", num_heads=1, scale=1.0), "heads", "num_heads"), "scale", "scale"),
        n("Shape", ["q"], ["heads_dim"], start=1, end=2),
        _ints("zero_zero", [0, 0]),
        _ints("minus_one", [-1]),
        n("Concat", ["zero_zero", "heads_dim", "minus_one"], ["bsnh"], axis=0),
        n("Reshape", ["attended_bsh", "bsnh"], ["attended_bsnh"]),
        n("Transpose", ["attended_bsnh"], ["attended"], perm=[0, 2, 1, 3]),
        *_zero_rows(opset, "attended", "out"),
    ]
    return _function(name, opset, nodes, contrib.__doc__, extra_opsets={"com.microsoft": 1})


BODIES = {"dense": dense, "blocked": blocked, "attention": attention, "contrib": contrib}


def body(name: str, opset: int) -> FunctionProto:
    """The function of op type ``name`` (a key of :data:`OP_TYPES`)."""
    if name not in OP_TYPES:
        raise ValueError(f"unknown attention op type {name!r}; known: {', '.join(OP_TYPES)}")
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
            if cap and not LOWERINGS[target].softcap:   # Runtime.executes never asks this; a body must not drop it
                raise EdgeAttnError(f"internal error: node {node.name} soft-caps its scores, the {target} body "
                                    f"cannot; please report this")
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


def _function(name: str, opset: int, nodes, doc: str, extra_opsets: Optional[dict] = None) -> FunctionProto:
    lowering, bias, _ = OP_TYPES[name]
    tables = list(TABLE_INPUTS[LOWERINGS[lowering].layout])
    inputs = list(QKV) + (tables if bias else tables[:-1])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_function(DOMAIN, name, inputs, ["out"], nodes, opsets, attributes=list(ATTRIBUTES),
                                doc_string=doc.strip().splitlines()[0])


def _from_attribute(node, attribute: str, own: Optional[str] = None):
    """Make the node's attribute ``own`` (default: its only one) a reference to the calling node's ``attribute``,
    substituted at expansion."""
    [target] = [a for a in node.attribute if own is None or a.name == own]
    target.ref_attr_name = attribute
    return node


def _scaled_q():
    """q * scale, with the scale taken from the node's attribute and typed like q."""
    return [_from_attribute(helper.make_node("Constant", [], ["scale_f"], value_float=1.0), "scale"),
            _cast("scale_f", "scale_t"),
            helper.make_node("Mul", ["q", "scale_t"], ["q_scaled"])]


def _softcap(scores: str, out: str):
    """``softcap * tanh(scores / softcap)``, the softcap taken from the node's attribute and typed like q."""
    n = helper.make_node
    return [_from_attribute(n("Constant", [], ["softcap_f"], value_float=1.0), "softcap"),
            _cast("softcap_f", "softcap_t"),
            n("Div", [scores, "softcap_t"], [f"{scores}_over_cap"]),
            n("Tanh", [f"{scores}_over_cap"], [f"{scores}_tanh"]),
            n("Mul", [f"{scores}_tanh", "softcap_t"], [out])]


def _zero_rows_prologue():
    """Typed -inf and 0 constants."""
    return [_float("neg_inf_f", float("-inf")), _cast("neg_inf_f", "neg_inf"),
            _float("zero_f", 0.0), _cast("zero_f", "zero")]


def _zero_rows(opset: int, attended: str, out: str):
    """Rows of the mask without any allowed key softmax to NaN; make exactly those rows zeros (as torch does).

    This Where gets its own zero, shaped [1] so that no optimizer merges it with the prologue's scalar zero: OpenVINO's
    CPU plugin fuses the whole body into one snippet and refuses a scalar read inside two of its loops ("All
    consumers of a Scalar expression are expected to have the same loop IDs"), which happened for masks computed in
    the graph (Mask2Former), where the mask's Where is not folded away."""
    n = helper.make_node
    return [n("Cast", ["mask"], ["mask_i"], to=TensorProto.INT32),
            *_reduce_max(opset, "mask_i", "row_any_i"),
            n("Cast", ["row_any_i"], ["row_any"], to=TensorProto.BOOL),
            _float("rows_zero_f", [0.0]), _cast("rows_zero_f", "rows_zero"),
            n("Where", ["row_any", attended, "rows_zero"], [out])]


def _softmax(src: str, dst: str):
    """Softmax over keys computed in float32 whatever q's dtype (fp16/bf16 exponent sums stay exact enough); the
    casts are no-ops that runtimes drop in float32 models."""
    n = helper.make_node
    return [n("Cast", [src], [f"{src}_f32"], to=TensorProto.FLOAT),
            n("Softmax", [f"{src}_f32"], [f"{dst}_f32"], axis=-1),
            _cast(f"{dst}_f32", dst)]


def _cast(src: str, dst: str):
    """Cast to q's dtype.  A Cast with a static ``to`` (unlike CastLike on a runtime tensor) lets runtimes
    constant-fold everything derived from the tables once the function is inlined."""
    return _from_attribute(helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT), "dtype")


def _reduce_max(opset: int, x: str, out: str):
    """ReduceMax over the last axis, keepdims."""
    return _reduce("ReduceMax", opset, x, out, -1)


def _reduce(op: str, opset: int, x: str, out: str, axis: int, keepdims: int = 1) -> list:
    """ReduceMax or ReduceSum over one axis: ReduceMax's axes moved from attribute to input at opset 18 (ReduceSum's
    at 13, below every opset exported)."""
    if op == "ReduceSum" or opset >= 18:
        return [_ints(f"{out}_axis", [axis]), helper.make_node(op, [x, f"{out}_axis"], [out], keepdims=keepdims)]
    return [helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims)]


def _ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


def _float(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32), name))


# Constant attributes that hold a value directly, and the tensor each becomes
_CONSTANT_FORMS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


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


# the routed layout's bodies build on the helpers above
from .routed import routed, routed_dense  # noqa: E402

BODIES.update(routed=routed, routed_dense=routed_dense)
