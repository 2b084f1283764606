"""Which standard-op lowering each attention layer gets, per target runtime.

``dense``      MatMul / Add / Softmax over the whole (heads, Nq, Nkv) table; every runtime, every opset.
``blocked``    per query tile, Gather its keys, batched MatMul, bank mask, Softmax, Gather back; every runtime.
``attention``  the ONNX ``Attention`` op (opset >= 23) with the dense mask; every runtime.
``contrib``    onnxruntime's ``com.microsoft.MultiHeadAttention`` with ``attention_bias``; onnxruntime only.
``auto``       blocked when the block table scores at most half of what a dense table scores (sparse masks);
               otherwise a dense-table node (``attention`` at opset >= 23, else ``dense``) that each runtime
               executes its fastest way (``RUNS_AS``), so one file stays portable.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import onnx
import torch

from .. import tables
from ..attention import DYNAMIC_LOWERING, ONNX_DOMAIN
from ..errors import EdgeAttnError
from . import functions, metadata


@dataclass(frozen=True)
class Lowering:
    name: str
    layout: str                                  # the table layout its node carries
    min_opset: int = 17
    runtimes: Optional[frozenset] = None         # None: every runtime


LOWERINGS = {low.name: low for low in (
    Lowering("dense", functions.LOWERINGS["dense"]),
    Lowering("blocked", functions.LOWERINGS["blocked"]),
    Lowering("attention", functions.LOWERINGS["attention"], min_opset=23),
    Lowering("contrib", functions.LOWERINGS["contrib"], runtimes=frozenset({"ort-cpu", "ort-cuda"})),
)}
CHOICES = ("auto", *LOWERINGS)
ONNX_RUNTIMES = ("ort-cpu", "ort-cuda", "openvino-cpu")   # what a file is for when no target is named


# How a runtime executes the dense-table nodes of a file exported with ``auto``: the file keeps the portable body,
# the runtime swaps at load.  onnxruntime CPU runs its fused contrib MultiHeadAttention (causal N=2048, 2 heads x 32:
# 4.2 ms against 12.2 ms for MatMul/Softmax and 6.5 ms for Attention-23).  OpenVINO always converts dense-table
# nodes to its ScaledDotProductAttention (runtimes/openvino.py).  CUDA keeps the body until measured on a GPU.
RUNS_AS = {"ort-cpu": {"dense": "contrib", "attention": "contrib"},
           "openvino-cpu": {"dense": "sdpa", "attention": "sdpa"}}


def runs_as(runtime: str, lowering: str, requested: str) -> str:
    """What ``runtime`` executes for a node of ``lowering`` in a file exported with lowering ``requested``."""
    if runtime == "openvino-cpu" or requested == "auto":
        return RUNS_AS.get(runtime, {}).get(lowering, lowering)
    return lowering


def for_runtime(model: onnx.ModelProto, runtime: str) -> onnx.ModelProto:
    """Swap the bodies of ``auto`` dense-table nodes for the ones ``runtime`` runs fastest (in memory)."""
    meta = metadata.read(model)
    opset = meta.get("opset")
    swapped = set()
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain != ONNX_DOMAIN or "lowering" not in attrs:
            continue
        lowering = attrs["lowering"].decode()
        target = runs_as(runtime, lowering, meta.get("lowering", ""))
        if target != lowering and target in LOWERINGS:
            node.overload = node.overload.replace(lowering, target, 1)
            swapped.add(node.overload)
    have = {f.overload for f in model.functions if f.domain == ONNX_DOMAIN}
    for overload in sorted(swapped - have):
        model.functions.append(functions.body(overload, opset))
    functions.import_domains(model)
    return model


@dataclass(frozen=True)
class Choice:
    lowering: str
    reason: str
    table: Optional[object] = None    # the table choose() already built for this lowering, if any


def check(lowering: str, opset: int, targets: Sequence[str]) -> None:
    """Refuse a lowering the opset or a named target runtime cannot run, saying what to change."""
    if lowering not in CHOICES:
        raise EdgeAttnError(f"unknown lowering {lowering!r}; choose one of: {', '.join(CHOICES)}")
    if lowering == "auto":
        return
    low = LOWERINGS[lowering]
    if opset < low.min_opset:
        raise EdgeAttnError(f"the {lowering} lowering needs opset >= {low.min_opset} (the ONNX Attention op), "
                            f"got opset {opset}; pass --opset {low.min_opset} or another lowering")
    unsupported = [t for t in targets if low.runtimes is not None and t not in low.runtimes]
    if unsupported:
        raise EdgeAttnError(f"the {lowering} lowering runs on {', '.join(sorted(low.runtimes))} only, not on "
                            f"{', '.join(unsupported)}; use --lowering auto, dense or blocked for those runtimes")


def choose(table: "torch.nn.Module", requested: str, opset: int) -> Choice:
    """The lowering for one MaskTable layer (the target runtimes only matter through ``RUNS_AS``)."""
    if requested != "auto":
        return Choice(requested, "requested")
    if table.layout == "blocked":
        blocked, work = table.table, table.table.work_fraction
    else:   # a dense table built by layout="auto" already knows the work of the block table it declined
        blocked, work = None, table.table.blocked_work
    if work is None:
        blocked = tables.build(table.mask, table.shape.q_len, table.shape.kv_len, table.shape.grid, table.heads,
                               "blocked")
        work = blocked.work_fraction
    if work <= tables.AUTO_BLOCKED_MAX_WORK:
        return Choice("blocked", f"block table scores {work:.1%} of the dense scores", blocked)
    why = f"block table would score {work:.0%} of the dense scores"
    if opset >= LOWERINGS["attention"].min_opset:
        return Choice("attention", f"{why}; opset {opset} has the Attention op")
    return Choice("dense", why)


def choose_dynamic(requested: str, opset: int) -> Choice:
    """The lowering for attention over a mask the model computes from its inputs: a dense-table node."""
    why = "mask computed in the graph"
    if requested in ("dense", "attention", "contrib"):
        return Choice(requested, "requested")
    if requested == "blocked":
        return Choice("dense", f"{why}: no static block table")
    if opset >= LOWERINGS["attention"].min_opset:
        return Choice("attention", f"{why}; opset {opset} has the Attention op")
    return Choice("dense", why)


@contextlib.contextmanager
def applied(model: torch.nn.Module, requested: str, opset: int, targets: Sequence[str]) -> Iterator[list[Choice]]:
    """Give every MaskTable in ``model`` its lowering (switching its table layout if needed) for one export;
    layouts are restored afterwards.  Yields the choices in module order."""
    from ..layers import MaskTable

    check(requested, opset, targets)
    layers = [m for m in model.modules() if isinstance(m, MaskTable)]
    saved = [(m, m.table) for m in layers]
    choices = []
    dynamic = choose_dynamic(requested, opset)
    token = DYNAMIC_LOWERING.set((dynamic.lowering, dynamic.reason))
    try:
        for m in layers:
            choice = choose(m, requested, opset)
            if m.layout != LOWERINGS[choice.lowering].layout:
                m.use_layout(LOWERINGS[choice.lowering].layout, choice.table)
            m.lowering, m.lowering_reason = choice.lowering, choice.reason
            choices.append(choice)
        yield choices
    finally:
        DYNAMIC_LOWERING.reset(token)
        for m, table in saved:
            m.lowering, m.lowering_reason = None, ""
            if m.table is not table:
                m.use_layout(table.layout, table)
