"""The one attention op every edgeattn layer calls, ``edgeattn::masked_attention``.

In eager PyTorch it runs the reference kernel below.  Under ``torch.onnx.export`` it becomes one node of the
``edgeattn`` ONNX domain (``MaskedAttention``, version 1) that :mod:`edgeattn.export` gives a model-local function
body made of standard ops.

Semantics: ``softmax(q k^T * scale + bias, masked to the table) v``; a query whose row of the mask allows no key
returns zeros (what torch's SDPA does), never NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

ONNX_DOMAIN = "edgeattn"
ONNX_OP = "MaskedAttention"
ONNX_OP_VERSION = 1
# torch dtype -> ONNX TensorProto element type, passed to the node so its body can type constants statically
ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


@torch.library.custom_op("edgeattn::masked_attention", mutates_args=())
def _masked_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return reference_attention(q, k, v, mask, bias, scale)


@_masked_attention_op.register_fake
def _(q, k, v, mask, bias, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, scale = inputs
    ctx.save_for_backward(q, k, v, mask, bias)
    ctx.scale = scale


def _backward(ctx, grad):
    """Gradients by differentiating the reference kernel: layers stay trainable (fine-tune, then export)."""
    q, k, v, mask, bias = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bias_leaf = bias.detach().requires_grad_() if bias is not None else None
        out = reference_attention(*leaves, mask, bias_leaf, ctx.scale)
        wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad(out, wrt, grad)
    return grads[0], grads[1], grads[2], None, grads[3] if bias is not None else None, None


_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention(q, k, v, mask, bias, scale: float):
    """q (B, H, Nq, D), k/v (B, H, Nkv, D), mask bool (H or 1, Nq, Nkv), bias float (H or 1, Nq, Nkv) or None."""
    attn_mask = mask if bias is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    # SDPA already returns zeros for rows without any allowed key; the where keeps that a guarantee.
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))


def masked_attention(q, k, v, mask, bias=None, scale: Optional[float] = None, mask_name: str = "") -> torch.Tensor:
    """Masked attention over a boolean table (True = may attend); see the module docstring for the semantics."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True where a query may attend a key), got {mask.dtype}; "
                         f"pass additive float biases as bias=")
    scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if torch.onnx.is_in_onnx_export():
        if q.dtype not in ONNX_DTYPES:
            raise ValueError(f"masked_attention exports float32/float16/bfloat16/float64 inputs, got {q.dtype}")
        attrs = {"scale": scale, "mask": mask_name, "dtype": ONNX_DTYPES[q.dtype]}
        return torch.onnx.ops.symbolic(f"{ONNX_DOMAIN}::{ONNX_OP}", [q, k, v, mask, bias], attrs, dtype=q.dtype,
                                       shape=tuple(q.shape[:-1]) + tuple(v.shape[-1:]), version=ONNX_OP_VERSION)
    return _masked_attention_op(q, k, v, mask, bias, scale)
