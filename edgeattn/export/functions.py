"""Standard-op bodies for ``edgeattn.MaskedAttention``, written as ONNX model-local functions.

Each lowering is a function *overload* of the one op (ONNX IR >= 10), so a node names its body by
``node.overload``.  onnxruntime expands the function itself; ``onnx.inliner`` expands it for runtimes that do not.
"""
from __future__ import annotations

from onnx import FunctionProto, TensorProto, helper

from ..attention import ONNX_DOMAIN, ONNX_OP

# overload name -> whether the node passes an additive bias as its 5th input
OVERLOADS = {"dense": False, "dense_bias": True}
ATTRIBUTES = ["scale", "mask", "dtype"]   # dtype: ONNX element type of q, so constants are typed statically


def overload_for(has_bias: bool) -> str:
    return next(name for name, bias in OVERLOADS.items() if bias == has_bias)


def dense(opset: int, overload: str) -> FunctionProto:
    """MatMul / Add / Softmax / MatMul over a dense boolean table.

    The table becomes an additive 0 / -inf mask (exact in every float dtype); a row with no allowed key then
    softmaxes to NaN, and the last Where turns exactly those rows to zeros, matching torch.
    """
    bias = OVERLOADS[overload]
    n = helper.make_node
    nodes = [
        _from_attribute(n("Constant", [], ["scale_f"], value_float=1.0), "scale"),
        _cast("scale_f", "scale_t"),
        n("Mul", ["q", "scale_t"], ["q_scaled"]),
        n("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_scaled", "k_t"], ["scores"]),
    ]
    nodes += [
        n("Constant", [], ["neg_inf_f"], value_float=float("-inf")),
        _cast("neg_inf_f", "neg_inf"),
        n("Constant", [], ["zero_f"], value_float=0.0),
        _cast("zero_f", "zero"),
        # The additive mask is computed on the (heads or 1, Nq, Nkv) table, not on the (B, H, Nq, Nkv) scores:
        # runtimes constant-fold it for static tables, and one broadcast Add is much faster than a broadcast Where.
        n("Where", ["mask", "zero", "neg_inf"], ["mask_add"]),
    ]
    if bias:
        nodes += [_cast("bias", "bias_t"), n("Add", ["bias_t", "mask_add"], ["bias_add"])]
    nodes += [
        n("Add", ["scores", "bias_add" if bias else "mask_add"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v"], ["attended"]),
        n("Cast", ["mask"], ["mask_i"], to=TensorProto.INT32),
        *_reduce_max(opset, "mask_i", "row_any_i"),
        n("Cast", ["row_any_i"], ["row_any"], to=TensorProto.BOOL),
        n("Where", ["row_any", "attended", "zero"], ["out"]),
    ]
    inputs = ["q", "k", "v", "mask"] + (["bias"] if bias else [])
    fn = helper.make_function(ONNX_DOMAIN, ONNX_OP, inputs, ["out"], nodes, [helper.make_opsetid("", opset)],
                              attributes=ATTRIBUTES, doc_string=dense.__doc__.splitlines()[0])
    fn.overload = overload
    return fn


def body(overload: str, opset: int) -> FunctionProto:
    if overload not in OVERLOADS:
        raise ValueError(f"unknown lowering {overload!r}; known: {', '.join(OVERLOADS)}")
    return dense(opset, overload)


def _from_attribute(node, attribute: str):
    """Make the node's first attribute a reference to the calling node's ``attribute``, substituted at expansion."""
    node.attribute[0].ref_attr_name = attribute
    return node


def _cast(src: str, dst: str):
    """Cast to q's dtype.  A Cast with a static ``to`` (unlike CastLike on a runtime tensor) lets runtimes
    constant-fold everything derived from the tables once the function is inlined."""
    return _from_attribute(helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT), "dtype")


def _reduce_max(opset: int, x: str, out: str):
    """ReduceMax over the last axis, keepdims; axes moved from attribute to input at opset 18."""
    if opset >= 18:
        return [helper.make_node("Constant", [], ["last_axis"], value_ints=[-1]),
                helper.make_node("ReduceMax", [x, "last_axis"], [out], keepdims=1)]
    return [helper.make_node("ReduceMax", [x], [out], axes=[-1], keepdims=1)]
