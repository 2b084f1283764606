"""Soft-capped scores (Gemma 2, FlexAttention's soft-capping score_mod): softcap * tanh(q k^T * scale / softcap), then
the bias and the mask, on every kernel, lowering and runtime."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeattn import EdgeAttnError, export_onnx, load, masks, onnxfile, parity, runtimes, tables
from edgeattn.attention import masked_attention
from edgeattn.cli import main
from edgeattn.layers import MaskTable
from edgeattn.onnxfile import DOMAIN
from edgeattn.runtimes.ort import for_runtime

from conftest import CPU_RUNTIMES
from reference.attention import naive_attention

CONSUME = Path(__file__).with_name("deploy") / "consume.py"  # runs files with edgeattn blocked
CAP = 2.0  # small against scores of ~+-10 (inputs times 3): the cap changes the outputs a lot
HEADS, N, D = 2, 64, 16


def _band(b, h, q, kv):  # a band of 11 keys; every query q = 3 (mod 8) allowed no key at all
    return (q % 8 != 3) & ((q - kv).abs() <= 5)


def _alibi(b, h, q, kv):
    return -0.1 * (h + 1) * (q - kv).abs()


MASKS = {"mask": masks.custom(_band, name="band"), "bias": masks.custom(_band, bias_mod=_alibi, name="band_alibi")}


def _qkv(dtype=torch.float32):
    return [torch.randn(1, HEADS, N, D, dtype=dtype) * 3 for _ in range(3)]


class Capped(torch.nn.Module):
    """A MaskTable called with a softcap: the file's inputs are q, k, v."""

    def __init__(self, mask, layout="dense", softcap=CAP):
        super().__init__()
        self.table, self.softcap = MaskTable(mask, HEADS, q_len=N, layout=layout), softcap

    def forward(self, q, k, v):
        return self.table(q, k, v, softcap=self.softcap)


def _export(tmp_path, model, inputs, name="m.onnx", **kwargs):
    return export_onnx(
        model.eval(), inputs, tmp_path / name, input_names=list("qkvb")[: len(inputs)], output_names=["y"], **kwargs
    )


def _assert_parity(model, inputs, path, atol=1e-5):
    results = parity.compare_model(model, inputs, path, CPU_RUNTIMES, runs=1)
    assert [r.runtime for r in results if r.runtime != "torch"] == CPU_RUNTIMES, parity.format_table(results)
    for r in results:
        assert r.ok and r.max_abs_err <= atol, parity.format_table(results)


@pytest.mark.parametrize("with_bias", ["mask", "bias"])
@pytest.mark.parametrize("layout", ["dense", "blocked"])
def test_kernels_match_the_brute_force_reference(layout, with_bias):
    mask = MASKS[with_bias]
    q, k, v = _qkv(torch.float64)
    got = Capped(mask, layout)(q, k, v)
    dense = tables.build(mask, q_len=N, heads=HEADS)
    want = naive_attention(q, k, v, dense.mask, dense.bias, D**-0.5, softcap=CAP)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert (got[:, :, 3::8] == 0).all() and not got.isnan().any()
    # the cap really changes the numbers, and a dense bias tensor passed at the call goes after the cap too
    assert (got - naive_attention(q, k, v, dense.mask, dense.bias, D**-0.5)).abs().max() > 0.1
    if layout == "dense" and dense.bias is not None:
        torch.testing.assert_close(masked_attention(q, k, v, dense.mask, dense.bias, softcap=CAP), want)


@pytest.mark.parametrize("layout", ["dense", "blocked"])
def test_gradients_and_opcheck(layout):
    table = MaskTable(
        masks.custom(lambda b, h, q, kv: (q != 2) & (kv <= q), bias_mod=_alibi, name="causal_row2"),
        HEADS,
        q_len=6,
        layout=layout,
    )
    q, k, v = (torch.randn(1, HEADS, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = table(q, k, v, softcap=0.5)
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))  # the fully masked row 2 leaks no NaN
    torch.autograd.gradcheck(lambda q, k, v: table(q, k, v, softcap=0.5), (q, k, v))
    tensors = [getattr(table, f"attn_{name}") for name in onnxfile.TABLE_INPUTS[layout]]
    torch.library.opcheck(
        torch.ops.edgeattn.masked_attention.default,
        (q.detach(), k.detach(), v.detach(), tensors[:-1], tensors[-1], layout, 0.5, 0.5),
    )


@pytest.mark.parametrize("softcap", [0, -1.0, math.nan, math.inf, True, "50", torch.tensor(2.0)])
def test_bad_softcap_is_one_clear_error(softcap):
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="softcap must be a positive finite float"):
        masked_attention(q, q, q, torch.ones(1, 4, 4, dtype=torch.bool), softcap=softcap)


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
@pytest.mark.parametrize("lowering,opset", [("dense", 18), ("blocked", 18), ("attention", 23)])
def test_every_lowering_matches_torch_on_both_runtimes(tmp_path, lowering, opset, custom_op):
    model, inputs = Capped(MASKS["bias"]), _qkv()
    result = _export(tmp_path, model, inputs, lowering=lowering, opset=opset, custom_op=custom_op)
    assert [(m["lowering"], m["softcap"]) for m in result.masks] == [(lowering, CAP)]
    proto = onnx.load(result.path)
    if custom_op:
        [node] = onnxfile.attention_nodes(proto)
        assert node.op_type == f"MaskedAttention_{lowering}_softcap_bias" and onnxfile.softcap(node) == CAP
        assert {op.domain: op.version for op in proto.opset_import}[DOMAIN] == onnxfile.SOFTCAP_OP_VERSION
        assert load(result.path, "openvino-cpu").fused_sdpa == 0  # SDPA has no softcap: the body runs
    else:
        ops = [n for n in proto.graph.node if n.op_type in ("Tanh", "Attention")]
        assert ops and all(n.domain == "" for n in proto.graph.node)
        if lowering == "attention":  # the Attention op's own softcap, which both runtimes apply before the mask
            [attention] = ops
            assert onnx.helper.get_attribute_value(next(a for a in attention.attribute if a.name == "softcap")) == CAP
    _assert_parity(model, inputs, result.path)


def test_auto_keeps_softcapped_nodes_off_contrib_and_sdpa(tmp_path):
    model, inputs = Capped(MASKS["mask"]), _qkv()
    result = _export(tmp_path, model, inputs, custom_op=True)
    assert result.masks[0]["lowering"] == "dense" and result.masks[0]["runs_as"] == {}
    # without a softcap the same file would run as MultiHeadAttention on onnxruntime and SDPA on OpenVINO
    plain = _export(tmp_path, Capped(MASKS["mask"], softcap=None), inputs, name="plain.onnx", custom_op=True)
    assert plain.masks[0]["runs_as"] == {"ort-cpu": "contrib", "openvino-cpu": "sdpa"}
    swapped = for_runtime(onnxfile.read(result.path), runtimes.get("ort-cpu"))
    assert [n.op_type for n in onnxfile.attention_nodes(swapped)] == ["MaskedAttention_dense_softcap"]
    _assert_parity(model, inputs, result.path)


def test_contrib_is_refused_for_softcapped_attention(tmp_path):
    with pytest.raises(EdgeAttnError, match="soft-caps its scores .*the contrib lowering cannot"):
        _export(tmp_path, Capped(MASKS["mask"]), _qkv(), custom_op=True, lowering="contrib", runtimes=["ort-cpu"])
    assert not list(tmp_path.iterdir())


class _ComputedMask(torch.nn.Module):
    """masked_attention over a mask and dense bias the model computes from an input."""

    def forward(self, q, k, v, b):
        return masked_attention(q, k, v, b > -1.0, b, softcap=CAP)


@pytest.mark.parametrize("opset", [18, 23])
def test_mask_computed_in_the_graph(tmp_path, opset):
    inputs = [*_qkv(), torch.randn(1, HEADS, N, N)]
    inputs[3][:, :, 5] = -2.0  # row 5 allows no key
    result = _export(tmp_path, _ComputedMask(), inputs, custom_op=True, opset=opset)
    assert [(m["lowering"], m["softcap"]) for m in result.masks] == [("attention" if opset == 23 else "dense", CAP)]
    _assert_parity(_ComputedMask(), inputs, result.path)


def test_plain_runtimes_without_edgeattn(tmp_path):
    """Default files in a subprocess that cannot import edgeattn: onnxruntime and OpenVINO as a deployment uses them."""
    model, inputs = Capped(MASKS["bias"]), _qkv()
    want = model(*inputs).detach().numpy()
    np.savez(tmp_path / "feeds.npz", **{name: t.numpy() for name, t in zip("qkv", inputs)})
    jobs = [
        {
            "name": low,
            "file": str(_export(tmp_path, model, inputs, f"{low}.onnx", lowering=low, opset=opset).path),
            "feeds": str(tmp_path / "feeds.npz"),
            "work": str(tmp_path / low),
        }
        for low, opset in (("dense", 18), ("blocked", 18), ("attention", 23))
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    for consumer in ("ort", "openvino"):
        done = subprocess.run(
            [sys.executable, str(CONSUME), consumer, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        for name, outcome in json.loads((tmp_path / "out.json").read_text()).items():
            assert "outputs" in outcome, f"{consumer} on {name}: {outcome}"
            # one output; OpenVINO may report it by another of its tensor's names (the blocked body's last Gather's)
            [got] = np.load(outcome["outputs"]).values()
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{consumer} {name}")


def test_inspect_shows_the_softcap_and_versions_tell_old_readers(tmp_path, capsys, monkeypatch):
    path = _export(tmp_path, Capped(MASKS["mask"]), _qkv(), custom_op=True, lowering="dense").path
    assert main(["inspect", str(path)]) == 0
    assert "\n  band x1: dense, softcap 2 (requested)\n" in capsys.readouterr().out
    # a file without softcap keeps node version 2, which an edgeattn that knows nothing of softcaps reads
    plain = _export(tmp_path, Capped(MASKS["mask"], softcap=None), _qkv(), "plain.onnx", custom_op=True).path
    assert {op.domain: op.version for op in onnx.load(plain).opset_import}[DOMAIN] == onnxfile.OLDEST_OP_VERSION
    # such an edgeattn refuses the softcapped file in one line (its OpenVINO runtime would drop the cap)
    monkeypatch.setattr(onnxfile, "OP_VERSION", onnxfile.OLDEST_OP_VERSION)
    onnxfile.read(plain)
    with pytest.raises(EdgeAttnError, match=f"{DOMAIN} opset 3, this edgeattn knows up to 2; upgrade edgeattn"):
        onnxfile.read(path)


def test_a_node_whose_softcap_contradicts_its_body_is_refused(tmp_path):
    path = _export(tmp_path, Capped(MASKS["mask"]), _qkv(), custom_op=True, lowering="dense").path
    proto = onnx.load(path)
    [node] = onnxfile.attention_nodes(proto)
    node.op_type = "MaskedAttention_dense"  # a body without the cap, the attribute still set
    onnx.save(proto, path)
    with pytest.raises(EdgeAttnError, match="has softcap 2, which its op type contradicts"):
        load(path, "openvino-cpu")
