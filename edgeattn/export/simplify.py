"""Exact rewrites of the inlined graph that onnxruntime's and OpenVINO's own optimizers miss.

- :func:`drop_constant_where`: ``Where(cond, x, y)`` whose condition is computed from initializers only and is
  all true is ``x``.  Every attention body ends in such a Where: it zeroes the rows that have no allowed key, and
  for a static table in which every row has one (every vision mask) its condition folds to all true.  The runtimes
  fold the condition but still run the Where, an elementwise pass over every attention output.
- :func:`fusable_gelu`: below opset 20 torch.onnx writes exact GELU as ``x * (0.5 * (1 + erf(x / sqrt 2)))``;
  onnxruntime fuses only ``(x * 0.5) * (1 + erf(x / sqrt 2))`` into its Gelu kernel.  Multiplying by 0.5 is exact
  in binary floating point (short of subnormals), so the reordered product has the same value.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator


def drop_constant_where(proto: onnx.ModelProto) -> int:
    """Replace every Where whose condition is a constant all-true tensor and whose output has its ``x``'s shape by
    ``x``; returns how many went."""
    graph = proto.graph
    constants = _Constants(proto)
    outputs = {o.name for o in graph.output}
    always = [
        n
        for n in graph.node
        if n.op_type == "Where"
        and n.domain in ("", "ai.onnx")
        and n.output[0] not in outputs
        and _all_true(constants.value(n.input[0]))
    ]
    shapes = _shapes(proto) if always else {}  # shape inference only where a Where may go
    renamed = {
        n.output[0]: n.input[1]
        for n in always
        if shapes.get(n.output[0]) is not None and shapes.get(n.output[0]) == shapes.get(n.input[1])
    }
    if renamed:
        kept = [n for n in graph.node if not (n.op_type == "Where" and n.output[0] in renamed)]
        for n in kept:
            for i, name in enumerate(n.input):
                while name in renamed:
                    name = renamed[name]
                n.input[i] = name
        del graph.node[:]
        graph.node.extend(kept)
        _prune(graph)
    return len(renamed)


def fusable_gelu(proto: onnx.ModelProto) -> int:
    """Reorder ``x * (0.5 * (1 + erf(x / sqrt 2)))`` into ``(x * 0.5) * (1 + erf(x / sqrt 2))``; returns how many."""
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = _Constants(proto)

    def is_const(name, value):
        v = constants.value(name)
        return v is not None and v.size == 1 and np.isclose(float(v.reshape(-1)[0]), value, rtol=1e-6, atol=0)

    def op(name, op_type):
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    count = 0
    for half in [n for n in graph.node if n.op_type == "Mul" and n.domain in ("", "ai.onnx")]:
        # half = 0.5 * add, add = erf + 1, erf = Erf(x / sqrt 2), outer = x * half
        a, b = half.input
        c, add_name = (a, b) if is_const(a, 0.5) else (b, a)
        add = op(add_name, "Add") if is_const(c, 0.5) else None
        if add is None or len(consumers.get(half.output[0], [])) != 1:
            continue
        one, erf_name = (add.input[0], add.input[1]) if is_const(add.input[0], 1.0) else (add.input[1], add.input[0])
        erf = op(erf_name, "Erf") if is_const(one, 1.0) else None
        div = op(erf.input[0], "Div") if erf is not None else None
        if div is None or not is_const(div.input[1], np.sqrt(2.0)):
            continue
        x = div.input[0]
        [outer] = consumers[half.output[0]]
        if outer.op_type != "Mul" or sorted(outer.input) != sorted([x, half.output[0]]):
            continue
        half.input[:] = [x, c]  # half = x * 0.5
        outer.input[:] = [half.output[0], add_name]  # outer = half * (1 + erf(...))
        count += 1
    return count


def _all_true(value: Optional[np.ndarray]) -> bool:
    return value is not None and value.dtype == bool and bool(value.all())


class _Constants:
    """Values computed from initializers and Constant nodes only, evaluated with onnx's reference runtime."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.producers = {o: n for n in proto.graph.node for o in n.output}
        self.initializers = {i.name: i for i in proto.graph.initializer}
        self.cache: dict[str, Optional[np.ndarray]] = {}

    def value(self, name: str) -> Optional[np.ndarray]:
        if name not in self.cache:
            self.cache[name] = self._evaluate(name)
        return self.cache[name]

    def _evaluate(self, name: str) -> Optional[np.ndarray]:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        needed, used, stack = set(), set(), [name]
        while stack:
            value = stack.pop()
            if value in needed or value == "":
                continue
            if value in self.initializers:
                used.add(value)
                continue
            node = self.producers.get(value)
            if node is None or node.domain not in ("", "ai.onnx") or any(a.g.node or a.graphs for a in node.attribute):
                return None  # a graph input, a custom op or a subgraph: not a constant we evaluate
            needed.update(node.output)
            stack.extend(node.input)
        nodes = [n for n in self.proto.graph.node if n.output[0] in needed]
        graph = helper.make_graph(
            nodes,
            "constant",
            [],
            [helper.make_value_info(name, onnx.TypeProto())],
            [self.initializers[i] for i in sorted(used)],
        )
        model = helper.make_model(graph, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        try:
            return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
        except Exception:  # an op the reference runtime lacks: leave the node as it is
            return None


def _shapes(proto: onnx.ModelProto) -> dict:
    """Inferred static shapes, name -> tuple of dims (ints or symbols); None where a dim is unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # a model over protobuf's 2 GB cannot be inferred in memory: rewrite nothing
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim
            ]
            shapes[info.name] = None if None in dims else tuple(dims)
    return shapes


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used, repeatedly, and initializers nothing reads (a graph with
    subgraphs, which may read outer names implicitly, keeps all of them)."""
    if any(a.g.node or a.graphs for n in graph.node for a in n.attribute):
        return
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        kept = [n for n in graph.node if any(o in used for o in n.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    kept_init = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
