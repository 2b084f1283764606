"""The one attention op every edgeattn layer calls, ``edgeattn::masked_attention``.

In eager PyTorch it runs the reference kernel below.  Under ``torch.onnx.export`` it becomes one node of the
``edgeattn`` ONNX domain (``MaskedAttention``, see :mod:`edgeattn.signature`) to which :mod:`edgeattn.export` gives
a body made of standard ops: inlined into the file by default, or kept as a model-local function of an
``edgeattn`` node with ``custom_op=True``, where the file's node version is 2, or 3 when a node is soft-capped.

Semantics: ``softmax(cap(q k^T * scale) + bias, masked to the table) v``, where ``cap(s)`` is ``softcap *
tanh(s / softcap)`` when ``softcap`` is set (Gemma 2, FlexAttention's soft-capping score_mod: the scaled scores are
capped before the bias and the mask) and ``s`` otherwise; a query whose row of the mask allows no key returns zeros
(what torch's SDPA does), never NaN.  The table is dense (a (heads, Nq, Nkv) mask) or blocked
(tiles of queries with gathered keys); both layouts compute the same numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F

from .errors import InvalidArgument
from .signature import DOMAIN, OP, OP_VERSION, TABLE_INPUTS

# torch dtype -> ONNX TensorProto element type, passed to the node so its body can type constants statically
ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


@torch.library.custom_op("edgeattn::masked_attention", mutates_args=())
def _masked_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: list[torch.Tensor],
    bias: Optional[torch.Tensor],
    layout: str,
    scale: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    return _KERNELS[layout](q, k, v, *tables, bias, scale=scale, softcap=softcap)


@_masked_attention_op.register_fake
def _(q, k, v, tables, bias, layout, scale, softcap=None):
    return q.new_empty(_out_shape(q, v, layout, tables))


def _out_shape(q, v, layout: str, tables) -> tuple:
    """(B, H, rows, Dv): a blocked table returns len(q_pos) rows (all queries, or a bucket's tile rows)."""
    rows = tables[2].shape[0] if layout == "blocked" else q.shape[2]
    return (*q.shape[:2], rows, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, tables, bias, layout, scale, softcap = inputs
    ctx.save_for_backward(q, k, v, bias, *tables)
    ctx.layout, ctx.scale, ctx.softcap = layout, scale, softcap


def _backward(ctx, grad):
    """Gradients by differentiating the kernel: layers stay trainable (fine-tune, then export)."""
    q, k, v, bias, *tables = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bias_leaf = bias.detach().requires_grad_() if bias is not None else None
        out = _KERNELS[ctx.layout](*leaves, *tables, bias_leaf, scale=ctx.scale, softcap=ctx.softcap)
        wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad(out, wrt, grad)
    bias_grad = grads[3] if bias is not None else None
    # one entry per input the op was called with: the dispatcher drops a trailing softcap=None (its default)
    return (grads[0], grads[1], grads[2], [None] * len(tables), bias_grad, None, None, None)[
        : len(ctx.needs_input_grad)
    ]


_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """q (B, H, Nq, D), k/v (B, H, Nkv, D), mask bool and bias float (or None) broadcasting to (B, H, Nq, Nkv);
    extra axes before Nq (a block table's tiles) pass through."""
    if softcap is not None:  # SDPA cannot cap its scores: the same steps written out
        return _capped_attention(q, k, v, mask, bias, scale, softcap)
    attn_mask = mask if bias is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    # SDPA already returns zeros for rows without any allowed key; the where keeps that a guarantee.
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))


def _capped_attention(q, k, v, mask, bias, scale: float, softcap: float):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(q.dtype)
    # softmax in at least float32 whatever q's dtype, as the exported bodies do
    wide = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores.to(wide).masked_fill(~mask, float("-inf")), -1).to(q.dtype)
    # A row without any allowed key softmaxes to NaN: zero it before the MatMul, so neither the output nor v's
    # gradient sees the NaN (the masked_fill above already keeps it from q's and k's gradients).
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype))
    return torch.matmul(probs, v)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
    q_pos: torch.Tensor,
    bank: torch.Tensor,
    block: torch.Tensor,
    bank_bias: Optional[torch.Tensor],
    scale: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """The same attention on a BlockTable: per tile, only its gathered keys are scored (the reference kernel on
    (B, H, T, tq, K) blocks), then the queries are put back in order."""
    bias = None if bank_bias is None else bank_bias[block].transpose(0, 1)
    out = reference_attention(
        _gather(q, q_index),
        _gather(k, kv_index),
        _gather(v, kv_index),
        bank[block].transpose(0, 1),
        bias,
        scale,
        softcap,
    )  # (B, H, T, tq, Dv)
    return out.flatten(2, 3).index_select(2, q_pos)


def _gather(x, index):
    """x[:, :, index] for a (T, n) index -> (B, H, T, n, D).  index_select on a contiguous tensor: indexing the
    strided q/k/v views a qkv projection produces is an order of magnitude slower."""
    return x.contiguous().index_select(2, index.flatten()).unflatten(2, index.shape)


def routed_attention_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    local: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    softcap: Optional[float] = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """The reference of the routed layout (see :mod:`edgeattn.onnxfile.routed`): query i of block i // Bk attends
    the keys of its block that ``local[i % Bk]`` allows and every key of the blocks ``blocks[..., i, :]`` lists
    (-1: none).  Dense over ``chunk`` queries at a time, so memory stays O(chunk * N)."""
    if bias is not None or softcap is not None:
        raise InvalidArgument("the routed layout takes no bias and no softcap")
    bk, n = local.shape[0], k.shape[2]
    nb = n // bk
    key_block = torch.arange(n, device=q.device) // bk
    outs = []
    for start in range(0, q.shape[2], chunk):
        rows = torch.arange(start, min(start + chunk, q.shape[2]), device=q.device)
        chosen = blocks[:, :, rows]  # (B, H, c, S)
        hit = torch.zeros((*chosen.shape[:-1], nb + 1), dtype=torch.bool, device=q.device)
        hit.scatter_(-1, torch.where(chosen >= 0, chosen, nb), True)  # -1 -> the spare column nb
        mask = hit[..., :nb].index_select(-1, key_block)  # (B, H, c, N)
        own = (key_block == (rows // bk)[:, None]) & local[rows % bk][:, torch.arange(n, device=q.device) % bk]
        outs.append(reference_attention(q[:, :, rows], k, v, mask | own, None, scale))
    return torch.cat(outs, 2)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": reference_attention,
    "blocked": blocked_attention,
    "routed": routed_attention_kernel,
}


def masked_attention(
    q, k, v, mask, bias=None, scale: Optional[float] = None, mask_name: str = "", softcap: Optional[float] = None
) -> torch.Tensor:
    """Masked attention over a dense boolean table (True = may attend); see the module docstring.

    ``mask`` and ``bias`` broadcast to (B, H, Nq, Nkv): a static (heads or 1, Nq, Nkv) table, or tensors computed
    in the model from its inputs (data-dependent masks and decays), which export keeps as graph computations."""
    if mask.dtype != torch.bool:
        raise InvalidArgument(
            f"mask must be a bool tensor (True where a query may attend a key), got {mask.dtype}; "
            f"pass additive float biases as bias="
        )
    return attend(q, k, v, "dense", [mask, bias], scale, mask_name, softcap)


def attend(
    q,
    k,
    v,
    layout: str,
    tables: list,
    scale: Optional[float] = None,
    mask_name: str = "",
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention over the tensors of a table of ``layout`` (``table.tensors()`` plus a None for a missing bias).
    ``softcap``: None, or a positive float that caps the scaled scores at +-softcap (``softcap * tanh(s /
    softcap)``) before the bias and the mask.

    Under ONNX export this is one ``edgeattn.MaskedAttention`` node (see :mod:`edgeattn.onnxfile`); export gives
    it the body its plan chose (:mod:`edgeattn.export.plan`)."""
    if layout not in TABLE_INPUTS or len(tables) != len(TABLE_INPUTS[layout]):
        raise InvalidArgument(f"layout {layout!r} takes tables {TABLE_INPUTS.get(layout)}, got {len(tables)} tensors")
    scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    softcap = check_softcap(softcap)
    if torch.onnx.is_in_onnx_export():
        if q.dtype not in ONNX_DTYPES:
            raise InvalidArgument(f"masked_attention exports float32/float16/bfloat16/float64 inputs, got {q.dtype}")
        attrs = {
            "scale": scale,
            "mask": mask_name,
            "dtype": ONNX_DTYPES[q.dtype],
            "layout": layout,
            "heads": q.shape[1],
            **({"softcap": softcap} if softcap is not None else {}),
        }
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP}",
            [q, k, v, *tables],
            attrs,
            dtype=q.dtype,
            shape=_out_shape(q, v, layout, tables),
            version=OP_VERSION,
        )
    return _masked_attention_op(q, k, v, list(tables[:-1]), tables[-1], layout, scale, softcap)


def check_softcap(softcap) -> Optional[float]:
    """``softcap`` as a float, or None; one clear error for anything but a positive finite number."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 < cast(float, softcap) < math.inf:
        raise InvalidArgument(
            "softcap must be a positive finite float (the scores are capped to +-softcap, as Gemma "
            f"2's attn_logit_softcapping) or None for no capping, got {softcap!r}"
        )
    return float(softcap)
