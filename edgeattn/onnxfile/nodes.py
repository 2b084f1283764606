"""Node builders shared by the standard-op bodies (:mod:`.bodies`, :mod:`.routed`): each returns ONNX nodes whose
types follow the calling node's ``dtype`` attribute and whose scale and softcap refer to its attributes until the body
is inlined."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import FunctionProto, TensorProto, helper, numpy_helper

from ..signature import ATTRIBUTES, DOMAIN, QKV, TABLE_INPUTS
from . import LOWERINGS, OP_TYPES


def dense_nodes(opset: int, bias: bool, cap: bool) -> list:
    """The dense body's nodes: q, k, v and a boolean ``mask`` (and ``bias``) -> ``out``."""
    n = helper.make_node
    nodes = [
        *scaled_q(),
        n("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_scaled", "k_t"], ["scores"]),
        *(softcap_nodes("scores", "capped") if cap else []),
    ]
    nodes += zero_rows_prologue() + [
        # The additive mask is computed on the (heads or 1, Nq, Nkv) table, not on the (B, H, Nq, Nkv) scores:
        # runtimes constant-fold it for static tables, and one broadcast Add is much faster than a broadcast Where.
        n("Where", ["mask", "zero", "neg_inf"], ["mask_add"]),
    ]
    if bias:
        nodes += [cast("bias", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    return nodes + [
        n("Add", ["capped" if cap else "scores", "bias_add" if bias else "mask_add"], ["masked"]),
        *softmax("masked", "probs"),
        n("MatMul", ["probs", "v"], ["attended"]),
        *zero_rows(opset, "attended", "out"),
    ]


def function(
    name: str, opset: int, nodes: list, doc: Optional[str], extra_opsets: Optional[dict[str, int]] = None
) -> FunctionProto:
    assert doc is not None, "a body builder's __doc__ (python -OO strips docstrings)"
    lowering, bias, _ = OP_TYPES[name]
    tables = list(TABLE_INPUTS[LOWERINGS[lowering].layout])
    inputs = list(QKV) + (tables if bias else tables[:-1])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_function(
        DOMAIN,
        name,
        inputs,
        ["out"],
        nodes,
        opsets,
        attributes=list(ATTRIBUTES),
        doc_string=doc.strip().splitlines()[0],
    )


def from_attribute(node: onnx.NodeProto, attribute: str, own: Optional[str] = None) -> onnx.NodeProto:
    """Make the node's attribute ``own`` (default: its only one) a reference to the calling node's ``attribute``,
    substituted at expansion."""
    [target] = [a for a in node.attribute if own is None or a.name == own]
    target.ref_attr_name = attribute
    return node


def scaled_q() -> list[onnx.NodeProto]:
    """q * scale, with the scale taken from the node's attribute and typed like q."""
    return [
        from_attribute(helper.make_node("Constant", [], ["scale_f"], value_float=1.0), "scale"),
        cast("scale_f", "scale_t"),
        helper.make_node("Mul", ["q", "scale_t"], ["q_scaled"]),
    ]


def softcap_nodes(scores: str, out: str) -> list[onnx.NodeProto]:
    """``softcap * tanh(scores / softcap)``, the softcap taken from the node's attribute and typed like q."""
    n = helper.make_node
    return [
        from_attribute(n("Constant", [], ["softcap_f"], value_float=1.0), "softcap"),
        cast("softcap_f", "softcap_t"),
        n("Div", [scores, "softcap_t"], [f"{scores}_over_cap"]),
        n("Tanh", [f"{scores}_over_cap"], [f"{scores}_tanh"]),
        n("Mul", [f"{scores}_tanh", "softcap_t"], [out]),
    ]


def zero_rows_prologue() -> list[onnx.NodeProto]:
    """Typed -inf and 0 constants."""
    return [
        floats("neg_inf_f", float("-inf")),
        cast("neg_inf_f", "neg_inf"),
        floats("zero_f", 0.0),
        cast("zero_f", "zero"),
    ]


def zero_rows(opset: int, attended: str, out: str) -> list[onnx.NodeProto]:
    """Rows of the mask without any allowed key softmax to NaN; make exactly those rows zeros (as torch does).

    This Where gets its own zero, shaped [1] so that no optimizer merges it with the prologue's scalar zero: OpenVINO's
    CPU plugin fuses the whole body into one snippet and refuses a scalar read inside two of its loops ("All
    consumers of a Scalar expression are expected to have the same loop IDs"), which happened for masks computed in
    the graph (Mask2Former), where the mask's Where is not folded away."""
    n = helper.make_node
    return [
        n("Cast", ["mask"], ["mask_i"], to=TensorProto.INT32),
        *reduce_max(opset, "mask_i", "row_any_i"),
        n("Cast", ["row_any_i"], ["row_any"], to=TensorProto.BOOL),
        floats("rows_zero_f", [0.0]),
        cast("rows_zero_f", "rows_zero"),
        n("Where", ["row_any", attended, "rows_zero"], [out]),
    ]


def softmax(src: str, dst: str) -> list[onnx.NodeProto]:
    """Softmax over keys computed in float32 whatever q's dtype (fp16/bf16 exponent sums stay exact enough); the
    casts are no-ops that runtimes drop in float32 models."""
    n = helper.make_node
    return [
        n("Cast", [src], [f"{src}_f32"], to=TensorProto.FLOAT),
        n("Softmax", [f"{src}_f32"], [f"{dst}_f32"], axis=-1),
        cast(f"{dst}_f32", dst),
    ]


def cast(src: str, dst: str) -> onnx.NodeProto:
    """Cast to q's dtype.  A Cast with a static ``to`` (unlike CastLike on a runtime tensor) lets runtimes
    constant-fold everything derived from the tables once the function is inlined."""
    return from_attribute(helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT), "dtype")


def reduce_max(opset: int, x: str, out: str) -> list[onnx.NodeProto]:
    """ReduceMax over the last axis, keepdims."""
    return reduce("ReduceMax", opset, x, out, -1)


def reduce(op: str, opset: int, x: str, out: str, axis: int, keepdims: int = 1) -> list[onnx.NodeProto]:
    """ReduceMax or ReduceSum over one axis: ReduceMax's axes moved from attribute to input at opset 18 (ReduceSum's
    at 13, below every opset exported)."""
    if op == "ReduceSum" or opset >= 18:
        return [ints(f"{out}_axis", [axis]), helper.make_node(op, [x, f"{out}_axis"], [out], keepdims=keepdims)]
    return [helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims)]


def ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


def floats(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32), name))
