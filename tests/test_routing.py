"""Attention over key blocks routed in the graph (edgeattn.routing): MoBA's semantics against a brute-force reference,
the routed and routed_dense lowerings against eager on both CPU runtimes, ties, your own router, and errors."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeattn import EdgeAttnError, bench, export_onnx, load, parity
from edgeattn.layers import RoutedSelfAttention
from edgeattn.routing import candidates, moba_gate, pool_blocks, routed_attention, select_blocks

from conftest import CPU_RUNTIMES
from reference.moba import moba_attention


def qkv(n, heads=2, dim=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("n, block, top_k", [(256, 32, 3), (128, 32, 9), (96, 32, 2), (64, 16, 1), (64, 64, 3)])
def test_moba_matches_the_reference_semantics(n, block, top_k):
    q, k, v = qkv(n)
    got = routed_attention(q, k, v, block, top_k)
    want = moba_attention(q, k, v, block, top_k, scale=16**-0.5)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


class Routed(nn.Module):
    def __init__(self, block, top_k, causal=True, router=None):
        super().__init__()
        self.block, self.top_k, self.causal, self.router = block, top_k, causal, router

    def forward(self, q, k, v):
        return routed_attention(q, k, v, self.block, self.top_k, self.causal, self.router)


def check_export(tmp_path, model, inputs, lowering, want_lowering):
    path = tmp_path / f"{lowering}.onnx"
    result = export_onnx(model, inputs, path, lowering=lowering, input_names=["q", "k", "v"], output_names=["y"])
    assert [m["lowering"] for m in result.masks] == [want_lowering]
    results = parity.compare_model(model, inputs, path, CPU_RUNTIMES, runs=1)
    assert all(r.ok and r.max_abs_err <= 1e-5 for r in results), parity.format_table(results)
    return path


@pytest.mark.parametrize("lowering, body", [("auto", "routed"), ("dense", "routed_dense"), ("blocked", "routed")])
@pytest.mark.parametrize("causal", [True, False])
def test_lowerings_match_eager_on_cpu_runtimes(tmp_path, lowering, body, causal):
    model = Routed(32, 3, causal)
    check_export(tmp_path, model, qkv(256, batch=2), lowering, body)


def test_ties_go_to_the_lower_block_everywhere(tmp_path):
    # blocks 0 and 1 hold the same keys (equal gates for every query) but different values, so the choice shows in
    # the output; a query of block 2 may take one routed block: 0 or 1, always tied
    q, k, v = qkv(128)
    k[:, :, 32:64] = k[:, :, 0:32]
    gates = moba_gate(q, pool_blocks(k, 32))
    assert torch.equal(gates[..., 0], gates[..., 1])
    chosen = select_blocks(gates, candidates(128, 32, True), 1)
    assert (chosen[:, :, 64:96] == 0).all()
    check_export(tmp_path, Routed(32, 2), [q, k, v], "auto", "routed")


def test_every_query_choosing_the_same_blocks_fills_the_padded_groups(tmp_path):
    # a router that ranks blocks by index: every query takes the same earliest blocks, so one group holds N queries
    def first_blocks(q, pooled_k):
        return -torch.arange(pooled_k.shape[2], dtype=q.dtype).expand(*q.shape[:3], -1)

    check_export(tmp_path, Routed(16, 4, router=first_blocks), qkv(128), "auto", "routed")
    check_export(tmp_path, Routed(16, 4, causal=False, router=first_blocks), qkv(128), "auto", "routed")


def pooled_router(q, pooled_k):
    """One score row per query block: the block's mean query against each block's mean key."""
    return torch.matmul(pool_blocks(q, q.shape[2] // pooled_k.shape[2]), pooled_k.transpose(-1, -2))


def test_your_own_router_per_query_block(tmp_path):
    q, k, v = qkv(256, batch=2)
    model = Routed(32, 3, router=pooled_router)
    out = model(q, k, v)
    assert not torch.allclose(out, Routed(32, 3)(q, k, v))  # another choice than MoBA's per-query gate
    check_export(tmp_path, model, [q, k, v], "auto", "routed")


def test_layer_trains_and_exports(tmp_path):
    layer = RoutedSelfAttention(32, 2, block=16, top_k=3)
    x = torch.randn(2, 64, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
    path = tmp_path / "layer.onnx"
    export_onnx(layer.eval(), [x.detach()], path, input_names=["x"], output_names=["y"])
    got = load(path, "openvino-cpu").run({"x": x.detach().numpy()})["y"]
    np.testing.assert_allclose(got, layer(x).detach().numpy(), atol=1e-5, rtol=0)


def test_bad_input_is_one_clear_error(tmp_path):
    q, k, v = qkv(100)
    with pytest.raises(ValueError, match="blocks of 32, which must divide them; pad the sequence"):
        routed_attention(q, k, v, 32, 3)
    q, k, v = qkv(128)
    with pytest.raises(ValueError, match=r"router must return block scores shaped \(B, H, 128, 4\)"):
        routed_attention(q, k, v, 32, 3, router=lambda q, pk: pk)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        routed_attention(q, k, v, 32, 0)
    with pytest.raises(EdgeAttnError, match="no attention lowering; export it with --lowering auto"):
        export_onnx(Routed(32, 3), [q, k, v], tmp_path / "x.onnx", lowering="attention", opset=23)
    assert not (tmp_path / "x.onnx").exists()


def test_bench_marks_the_lowerings_routed_attention_has_not(tmp_path):
    rows = bench.run("moba-lm", ["ort-cpu"], runs=1, forms=["standard"])
    by_lowering = {r.lowering: r for r in rows if r.runtime == "ort-cpu"}
    assert by_lowering["auto:routed"].status == "ok" and by_lowering["dense:routed_dense"].status == "ok"
    assert by_lowering["blocked:routed"].status == "ok"
    for lowering in ("attention", "contrib"):
        assert by_lowering[lowering].status == "n/a" and "has no" in by_lowering[lowering].detail
    with pytest.raises(EdgeAttnError, match="has no attention lowering"):  # asked for by name: an error
        bench.run("moba-lm", ["ort-cpu"], lowerings=["attention"], runs=1, forms=["standard"])


def test_an_opset_torch_onnx_cannot_write_is_one_clear_error(tmp_path):
    # torch.onnx cannot take the block means' ReduceMean (axes as an input) down to opset 17 and keeps 18
    with pytest.raises(EdgeAttnError, match="torch.onnx wrote opset 18, not the 17 asked for.*--opset 18"):
        export_onnx(Routed(32, 3), qkv(128), tmp_path / "x.onnx", opset=17)
    assert not (tmp_path / "x.onnx").exists()


def test_an_ir_with_fp16_weights_keeps_the_disallowed_blocks_out(tmp_path, capsys):
    """ovc's default compression stores weights in fp16 and turns the routing table's -inf into -65504: the blocks a
    query may not take must stay out (they once came in, 0.64 from torch), and `check` says the weights are fp16 and
    how many decisions flipped."""
    import openvino as ov

    from edgeattn.cli import main
    from edgeattn.registered import export_registered

    onnx_file = tmp_path / "moba.onnx"
    export_registered("moba-block", onnx_file, seq_len=512, block=32, dim=32, heads=2)
    ov.save_model(ov.convert_model(str(onnx_file)), str(tmp_path / "ovc.xml"))  # compress_to_fp16, as ovc
    capsys.readouterr()
    main(["check", str(tmp_path / "ovc.xml"), "--runtime", "openvino-cpu", "--runtime", "torch", "--runs", "1"])
    out = capsys.readouterr().out
    assert "model moba-block" in out and "fp16 weights: ovc compresses them by default" in out
    row = next(line for line in out.splitlines() if line.startswith("openvino-cpu"))
    assert float(row.split()[2]) < 1e-2, out  # fp16 weights' rounding, not a wrong block
    assert "decisions flipped" in out or " ok " in row
