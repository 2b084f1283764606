"""Which body (lowering) each attention node of an export gets: the plan, chosen once before tracing.

``dense``, ``blocked``, ``attention`` and ``contrib`` are described in :data:`edgeattn.onnxfile.LOWERINGS`.
``auto`` picks ``blocked`` when the block table scores at most half of what a dense table scores (sparse masks);
otherwise a dense-table node (``attention`` at opset >= 23, else ``dense``) that each runtime executes its fastest
way (``Runtime.runs_as``), so one file stays portable.  Attention over a mask computed in the graph has no static
table: it gets a dense-table node.  Attention over key blocks a router chooses in the graph (:mod:`edgeattn.routing`)
gets ``routed``, or ``routed_dense`` when ``dense`` is asked for.

:func:`applied` switches every ``MaskTable`` to the table layout its lowering reads for the time of the trace and
yields the :class:`Plan`; export then gives each traced node its lowering from the plan, by the name its table has
in the graph, and records the choice and its reason in the file's metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional

import onnx
import torch

from .. import tables
from ..errors import EdgeAttnError, NoSuchLowering
from ..layers import MaskTable
from ..onnxfile import LOWERINGS, attributes, table_inputs


@dataclass(frozen=True)
class Choice:
    lowering: str
    reason: str
    table: Optional[object] = None  # the table for this lowering (choose(): if it built one; applied(): always)


@dataclass
class Plan:
    dynamic: Choice  # attention over masks computed in the graph
    static: dict[str, Choice] = field(default_factory=dict)  # a MaskTable's first table tensor's name -> choice
    requested: str = "auto"  # the lowering asked for (routed nodes follow it)

    def choice_for(self, node: onnx.NodeProto) -> Choice:
        """The choice for a traced attention node: its MaskTable's, found by the name of its first table tensor
        (the table buffer's qualified name), or the dynamic choice for masks computed in the graph."""
        if attributes(node).get("layout") == "routed":
            return choose_routed(self.requested)
        first = table_inputs(node)[:1]
        if not first or first[0] not in self.static:
            if first and first[0].rsplit(".", 1)[-1].startswith("attn_"):  # a MaskTable's buffer, unplanned
                raise EdgeAttnError(
                    f"internal error: attention node {node.name} reads table {first[0]}, which the "
                    f"export plan does not know; please report this"
                )
            return self.dynamic
        return self.static[first[0]]


def choose(table: "torch.nn.Module", requested: str, opset: int) -> Choice:
    """The lowering for one MaskTable layer."""
    if requested != "auto":
        return Choice(requested, "requested")
    if table.layout == "blocked":
        blocked, work = table.table, table.table.work_fraction
    else:  # a dense table built by layout="auto" already knows the work of the block table it declined
        blocked, work = None, table.table.blocked_work
    if work is None:
        blocked = tables.build(
            table.mask, table.shape.q_len, table.shape.kv_len, table.shape.grid, table.heads, "blocked"
        )
        work = blocked.work_fraction
    if work <= tables.AUTO_BLOCKED_MAX_WORK:
        return Choice("blocked", f"block table scores {work:.1%} of the dense scores", blocked)
    why = f"block table would score {work:.0%} of the dense scores"
    if opset >= LOWERINGS["attention"].min_opset:
        return Choice("attention", f"{why}; opset {opset} has the Attention op")
    return Choice("dense", why)


def bucket_choices(split: "tables.BucketedTable", opset: int) -> list[Choice]:
    """One choice per bucket of a bucketed table: ``blocked`` for block-table buckets, the dense-table lowering
    (``attention`` at opset >= 23, else ``dense``) for buckets that share one key list."""
    why = (
        f"{len(split.buckets)} buckets of query tiles by {split.by} score {split.work_fraction:.1%} of the dense scores"
    )
    dense = "attention" if opset >= LOWERINGS["attention"].min_opset else "dense"
    return [
        Choice(dense, f"{why}; this bucket's tiles share one key list")
        if isinstance(b, tables.DenseBucket)
        else Choice("blocked", why)
        for b in split.buckets
    ]


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


def choose_routed(requested: str) -> Choice:
    """The lowering for attention over blocks a router chooses in the graph (:mod:`edgeattn.routing`): ``routed``
    scores only the chosen blocks; ``dense`` asks for ``routed_dense``, the same choice as one dense mask."""
    if requested in ("auto", "blocked"):
        return Choice("routed", "blocks chosen in the graph: only they are scored")
    if requested == "dense":
        return Choice("routed_dense", "requested: the chosen blocks as one dense mask")
    raise NoSuchLowering(
        f"attention over blocks routed in the graph has no {requested} lowering; export it with "
        f"--lowering auto (only the chosen blocks are scored) or dense (the same choice as a dense "
        f"mask)"
    )


@contextlib.contextmanager
def applied(model: torch.nn.Module, requested: str, opset: int, prefix: str = "") -> Iterator[Plan]:
    """Choose every MaskTable's lowering in ``model`` and switch its table to the layout that lowering reads;
    layouts are restored afterwards.  ``prefix``: the model's name in the traced module (a precision wrapper)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MaskTable)]
    saved = [(m, m.table) for _, m in layers]
    plan = Plan(choose_dynamic(requested, opset), requested=requested)
    try:
        for name, m in layers:
            if requested == "auto" and isinstance(m.table, tables.BucketedTable):  # auto chose it when built
                choices = bucket_choices(m.table, opset)
            else:
                choice = choose(m, requested, opset)
                layout = LOWERINGS[choice.lowering].layout
                if m.layout != layout:
                    m.use_layout(layout, choice.table)
                choices = [choice]
            # the exporter names a lifted buffer by its qualified name; the choice keeps the table each node gets
            for (first, part, _), choice in zip(m.node_tables(), choices):
                plan.static[f"{prefix}{name + '.' if name else ''}{first}"] = dataclasses.replace(choice, table=part)
        yield plan
    finally:
        for m, table in saved:
            if m.table is not table:
                m.use_layout(table.layout, table)
