"""edgeattn-kernels (native/): the fused kernel behind the custom op, run by OpenVINO through its extension, against
PyTorch and against the same file's standard-op function body, and loaded by plain OpenVINO as a deployment does."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from edgeattn import EdgeAttnError, InvalidArgument, export_onnx, load, masks, parity, tables
from edgeattn.layers import MaskedSelfAttention, MaskTable

from conftest import require

kernels = pytest.importorskip("edgeattn_kernels", reason="edgeattn-kernels is not installed (pip install ./native)")


@pytest.fixture(autouse=True)
def _openvino():
    require("openvino-cpu")


def _documents(n):
    return masks.segments(torch.arange(n) * 3 // n)  # three documents


def _rows_without_keys(b, h, q, kv):  # a sliding window, with every fifth query allowed no key
    return (q % 5 != 2) & (kv <= q) & (q - kv < 12)


# name -> (mask, shape, dim, heads): small shapes; dim / heads is the head width (24 and 8 take the kernel's
# path for a width that is not a multiple of 16)
CASES = {
    "na1d": (masks.neighborhood(5), dict(grid=(40,)), 32, 2),
    "na2d_dilated": (masks.neighborhood(3, dilation=2), dict(grid=(10, 10)), 48, 2),
    "na3d": (masks.neighborhood(3), dict(grid=(4, 6, 6)), 32, 2),
    "swin_shifted_rpb": (masks.window(4, shift=2, rpb=True), dict(grid=(8, 8)), 32, 2),
    "sliding": (masks.sliding_window(16), dict(seq_len=96), 32, 2),
    "sinks": (masks.sinks(4, 16), dict(seq_len=96), 16, 2),
    "documents": (_documents(96), dict(seq_len=96), 32, 4),
    "rows_without_keys": (
        masks.custom(lambda b, h, q, kv: _rows_without_keys(b, h, q, kv), name="gaps"),
        dict(seq_len=60),
        32,
        2,
    ),
}


def _export(tmp_path, model, inputs, name, **kwargs):
    path = tmp_path / f"{name}.onnx"
    names = ["x"] if len(inputs) == 1 else ["q", "k", "v"]
    export_onnx(model.eval(), inputs, path, custom_op=True, input_names=names, output_names=["y"], **kwargs)
    return path


def _run(path, inputs, monkeypatch, kernels="auto"):
    monkeypatch.setenv("EDGEATTN_KERNELS", kernels)
    session = load(path, "openvino-cpu")
    feeds = {info.name: x.numpy() for info, x in zip(session.inputs, inputs)}
    return session.fused_kernel, session.run(feeds)["y"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_torch_and_the_function_body(tmp_path, monkeypatch, case):
    mask, shape, dim, heads = CASES[case]
    layer = MaskedSelfAttention(dim, heads, mask, layout="blocked", **shape)
    x = torch.randn(2, layer.seq_len, dim)
    with torch.no_grad():
        want = layer.eval()(x).numpy()
    path = _export(tmp_path, layer, [x], case, lowering="blocked")
    fused, got = _run(path, [x], monkeypatch)
    assert fused == 1
    assert np.abs(got - want).max() <= 1e-5
    fused, body = _run(path, [x], monkeypatch, kernels="0")
    assert fused == 0 and np.abs(got - body).max() <= 1e-5
    if case == "rows_without_keys":  # exact zeros before the projection: the projection's bias is all they get
        assert np.abs(got[:, 2::5] - layer.proj.bias.detach().numpy()).max() <= 1e-6


class Capped(torch.nn.Module):
    def __init__(self, mask, n, heads):
        super().__init__()
        self.table = MaskTable(mask, heads, q_len=n, layout="blocked")

    def forward(self, q, k, v):
        return self.table(q, k, v, softcap=5.0)


def test_softcap_and_fp16(tmp_path, monkeypatch):
    """The kernel caps the scaled scores before the mask, and computes fp16 nodes in fp32 between Converts."""
    model = Capped(masks.sliding_window(16), 64, 2).eval()
    qkv = [torch.randn(1, 2, 64, 32) * 3 for _ in range(3)]
    with torch.no_grad():
        want = model(*qkv).numpy()
    fused, got = _run(_export(tmp_path, model, qkv, "capped", lowering="blocked"), qkv, monkeypatch)
    assert fused == 1 and np.abs(got - want).max() <= 1e-5
    fused, half = _run(_export(tmp_path, model, qkv, "half", lowering="blocked", dtype="fp16"), qkv, monkeypatch)
    assert fused == 1 and np.abs(half - want).max() <= 2e-2  # fp16 inputs; the kernel itself is fp32


def test_buckets_of_a_table_each_run_the_kernel(tmp_path, monkeypatch):
    """A bucketed table's nodes each compute their bucket's rows (fewer than q's)."""
    layer = MaskedSelfAttention(32, 2, masks.sliding_window(40), seq_len=300, layout="blocked").eval()
    layer.table.use_layout("bucketed", tables.chunked(layer.table.table, 2))
    x = torch.randn(1, 300, 32)
    with torch.no_grad():
        want = layer(x).numpy()
    fused, got = _run(_export(tmp_path, layer, [x], "buckets"), [x], monkeypatch)
    assert fused == 3 and np.abs(got - want).max() <= 1e-5


def test_a_bad_table_is_one_clear_error(tmp_path, monkeypatch):
    layer = MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(6, 6), layout="blocked").eval()
    x = torch.randn(1, 36, 32)
    path = _export(tmp_path, layer, [x], "na")
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.domain == "edgeattn")
    q_pos = next(i for i in model.graph.initializer if i.name == node.input[5])
    values = onnx.numpy_helper.to_array(q_pos).copy()
    values[0] = 10**6  # past the table's tile rows
    q_pos.CopyFrom(onnx.numpy_helper.from_array(values, q_pos.name))
    onnx.save(model, path)
    with pytest.raises(EdgeAttnError, match="failed to run: edgeattn::MaskedAttention: a table index is out of range"):
        _run(path, [x], monkeypatch)


def test_dense_masks_with_a_batch_run_per_batch(tmp_path):
    """A dense mask computed in the graph may carry the batch (B, 1, Nq, Nk), as Mask2Former's does: the extension
    reads each batch's own mask (and gives zeros for a row without keys)."""
    import openvino as ov
    from onnx import TensorProto, helper

    B, H, N, D = 2, 2, 24, 16
    node = helper.make_node(
        "MaskedAttention_dense", ["q", "k", "v", "mask"], ["y"], domain="edgeattn", scale=D**-0.5, layout="dense"
    )
    qkv = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, H, N, D]) for name in "qkv"]
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, N, N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, N, D])
    graph = helper.make_graph([node], "g", [*qkv, mask], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("edgeattn", 2)])
    onnx.save(model, tmp_path / "dense.onnx")
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    allowed = torch.rand(B, 1, N, N) < 0.4
    allowed[1, 0, 5] = False  # a row without keys
    core = ov.Core()
    core.add_extension(str(kernels.openvino_library()))
    compiled = core.compile_model(core.read_model(tmp_path / "dense.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": allowed.numpy()})[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).nan_to_num(0.0)
    assert np.abs(got - want.numpy()).max() <= 1e-5 and (got[1, :, 5] == 0).all()


def test_check_says_which_nodes_ran_the_kernel(tmp_path):
    layer = MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(6, 6), layout="blocked").eval()
    x = torch.randn(1, 36, 32)
    [result] = parity.compare_model(layer, [x], _export(tmp_path, layer, [x], "na"), ["openvino-cpu"], runs=1)
    assert result.ok and result.detail == "1 attention node(s) ran edgeattn-kernels' fused kernel"


def test_settings_are_one_line_errors(tmp_path, monkeypatch):
    layer = MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(6, 6), layout="blocked")
    x = torch.randn(1, 36, 32)
    path = _export(tmp_path, layer, [x], "na")
    with pytest.raises(InvalidArgument, match="EDGEATTN_KERNELS is 'yes'"):
        _run(path, [x], monkeypatch, kernels="yes")
    monkeypatch.setattr(kernels, "OPENVINO_VERSION", "2025.0.0")  # as if built against another OpenVINO
    assert _run(path, [x], monkeypatch)[0] == 0  # auto: the function body
    with pytest.raises(EdgeAttnError, match="built against OpenVINO 2025.0.0.*pip install --no-build-isolation"):
        _run(path, [x], monkeypatch, kernels="1")


PLAIN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import openvino as ov
    import edgeattn_kernels

    core = ov.Core()
    core.add_extension(str(edgeattn_kernels.openvino_library()))
    found = {}
    for path in sys.argv[1:]:
        model = core.read_model(path)
        kinds = sorted({op.get_type_name() for op in model.get_ordered_ops()})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        data = np.load(path + ".npz")
        out = compiled({"x": data["x"]})[0]
        found[path] = dict(err=float(np.abs(out - data["y"]).max()), kernel="MaskedAttention" in kinds)
    print(json.dumps(found))
    """
)


def test_plain_openvino_runs_dense_and_blocked_nodes_with_the_extension(tmp_path):
    """A deployment that never imports edgeattn: add_extension, read_model, compile, run."""
    paths = []
    for lowering, mask in (("dense", masks.causal()), ("blocked", masks.neighborhood(3))):
        shape = dict(seq_len=36) if lowering == "dense" else dict(grid=(6, 6))
        layer = MaskedSelfAttention(32, 2, mask, layout=lowering, **shape).eval()
        x = torch.randn(1, 36, 32)
        path = _export(tmp_path, layer, [x], lowering, lowering=lowering)
        with torch.no_grad():
            np.savez(f"{path}.npz", x=x.numpy(), y=layer(x).numpy())
        paths.append(str(path))
    code = "import sys; sys.modules['edgeattn'] = None\n" + PLAIN  # importing edgeattn would fail
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(f["kernel"] and f["err"] <= 1e-5 for f in found.values()), found
