"""edgeattn.export.simplify: exact rewrites the runtimes' optimizers miss (constant all-true Where, GELU order)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export import _assert_parity

from edgeattn import export_onnx, masks
from edgeattn.export import simplify
from edgeattn.layers import MaskedBlock, MaskedSelfAttention

from conftest import CPU_RUNTIMES


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model, op_type):
    return sum(n.op_type == op_type for n in model.graph.node)


def test_where_goes_only_when_its_condition_is_constant_all_true_and_it_keeps_the_shape():
    init = numpy_helper.from_array
    n = helper.make_node
    graph = helper.make_graph(
        [
            n("Not", ["all_false"], ["all_true"]),  # constant, computed: folded by evaluation
            n("Where", ["all_true", "x", "zero"], ["gone"]),
            n("Where", ["some_false", "x", "zero"], ["kept_false"]),
            n("Greater", ["x", "zero"], ["from_input"]),
            n("Where", ["from_input", "x", "zero"], ["kept_input"]),
            n("Where", ["wide_true", "row", "zero"], ["kept_broadcast"]),  # (2, 3) out of a (3,) x: not the identity
            n("Add", ["gone", "kept_false"], ["s1"]),
            n("Add", ["s1", "kept_input"], ["s2"]),
            n("Add", ["s2", "kept_broadcast"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            init(np.zeros((2, 1), bool), "all_false"),
            init(np.array([[True], [False]]), "some_false"),
            init(np.ones((2, 3), bool), "wide_true"),
            init(np.float32([0.0]), "zero"),
            init(np.float32([1, 2, 3]), "row"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = _run(model, x)[0]
    assert simplify.drop_constant_where(model) == 1
    assert _ops(model, "Where") == 3 and _ops(model, "Not") == 0  # the dead condition went with it
    assert [i.name for i in model.graph.initializer if i.name == "all_false"] == []
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run(model, x)[0], before)


def test_static_tables_without_empty_rows_lose_their_row_zeroing_and_others_keep_it(tmp_path):
    def export(mask, name):
        layer = MaskedSelfAttention(16, 2, mask, seq_len=12, layout="dense").eval()
        x = torch.randn(1, 12, 16)
        path = export_onnx(layer, [x], tmp_path / name, input_names=["x"], output_names=["y"], lowering="dense").path
        _assert_parity(layer, x, path, CPU_RUNTIMES, atol=1e-5)
        return onnx.load(path)

    every_row = export(masks.causal(), "causal.onnx")
    empty_rows = export(
        masks.custom(lambda b, h, q, kv: (q % 4 != 1) & (kv <= q), name="rows_1mod4_empty"), "empty.onnx"
    )
    # the dense body has two Wheres: the 0 / -inf mask (kept, runtimes fold it) and the row-zeroing
    assert _ops(every_row, "Where") == 1
    assert _ops(empty_rows, "Where") == 2


@pytest.mark.parametrize("custom_op", [False, True], ids=["standard", "custom-op"])
def test_gelu_reaches_onnxruntime_in_the_order_it_fuses(tmp_path, custom_op):
    block = MaskedBlock(32, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    x = torch.randn(1, 36, 32)
    path = export_onnx(
        block, [x], tmp_path / "block.onnx", input_names=["x"], output_names=["y"], custom_op=custom_op
    ).path
    _assert_parity(block, x, path, CPU_RUNTIMES)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert _ops(optimized, "Gelu") == 1 and _ops(optimized, "Erf") == 0
