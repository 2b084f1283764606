"""FlexAttention code converted to edgeattn: the converted module against torch's own flex_attention (eager), the
exported file on onnxruntime and OpenVINO, and in a plain runtime that never imports edgeattn."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import edgeattn
from edgeattn.errors import EdgeAttnError

from conftest import CPU_RUNTIMES, require

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CONSUME = Path(__file__).parents[1] / "deploy" / "consume.py"
N, HEADS, DIM = 96, 4, 64
_COMPILED = None  # set by test_torch_compiled_flex_attention_is_converted_too
DOC = torch.tensor([0] * 40 + [1] * 30 + [2] * 26)  # document ids of the tokens (the same for every sequence)


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 24)


def prefix_lm(b, h, q, kv):
    return (kv < 16) | (q >= kv)


def document(b, h, q, kv):
    return (DOC[q] == DOC[kv]) & (q >= kv)


def dilated(b, h, q, kv):
    return ((q - kv).abs() <= 20) & ((q - kv) % 2 == 0)


def alibi(score, b, h, q, kv):
    return score + (2.0 ** -(h + 1.0)) * (kv - q)


def softcap(score, b, h, q, kv):
    return 20.0 * torch.tanh(score / 20.0)


class Attention(nn.Module):
    """A user's attention block written with FlexAttention: qkv projection, flex_attention, output projection."""

    def __init__(self, mask_mod=None, score_mod=None, kv_heads=HEADS, rel_bias=False, scale=None):
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, DIM // HEADS
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(DIM, DIM)
        self.block_mask = (
            None if mask_mod is None else create_block_mask(mask_mod, None, None, N, N, device="cpu", BLOCK_SIZE=32)
        )
        self.score_mod, self.scale = score_mod, scale
        self.rel = nn.Parameter(torch.randn(HEADS, 2 * N - 1) * 0.5) if rel_bias else None

    def forward(self, x):
        B, n, _ = x.shape
        q = self.q(x).view(B, n, HEADS, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        score_mod = self.score_mod
        if self.rel is not None:
            rel = self.rel

            def score_mod(score, b, h, qi, ki):  # a learned relative bias, read from a Parameter
                return score + rel[h, qi - ki + n - 1]

        y = flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=self.block_mask,
            scale=self.scale,
            enable_gqa=self.kv_heads != HEADS,
        )
        return self.proj(y.transpose(1, 2).reshape(B, n, DIM))


CASES = {
    "causal": dict(mask_mod=causal),
    "sliding-alibi": dict(mask_mod=sliding, score_mod=alibi),
    "prefix-lm-gqa": dict(mask_mod=prefix_lm, kv_heads=2),
    "document-scale": dict(mask_mod=document, scale=0.3),
    "dilated-rel-bias": dict(mask_mod=dilated, rel_bias=True),
    "no-mask-softcap": dict(score_mod=softcap),
    "causal-softcap-alibi": dict(
        mask_mod=causal, score_mod=lambda s, b, h, q, kv: softcap(s, b, h, q, kv) + alibi(0.0, b, h, q, kv)
    ),
}


def _pair(case, seed=0):
    torch.manual_seed(seed)
    model = Attention(**CASES[case]).eval()
    return model, torch.randn(2, N, DIM)


@pytest.mark.parametrize("layout", ["dense", "blocked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_module_matches_flex_attention(case, layout):
    model, x = _pair(case)
    converted = edgeattn.convert(model, x, layout=layout)
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert not hasattr(model, "edgeattn_flex")  # the original is left as it was
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert all(site.table.layout == layout for site in converted.edgeattn_flex.sites)


def _dense_reference(model, x):
    """The dilated-rel-bias case written out with a dense mask (flex_attention has no backward on CPU)."""
    B, n, _ = x.shape
    q = model.q(x).view(B, n, HEADS, -1).transpose(1, 2)
    k, v = model.kv(x).view(B, n, 2, HEADS, -1).permute(2, 0, 3, 1, 4)
    qi, ki = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    scores = q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5 + model.rel[:, qi - ki + n - 1]
    y = scores.masked_fill(~dilated(0, 0, qi, ki), float("-inf")).softmax(-1) @ v
    return model.proj(y.transpose(1, 2).reshape(B, n, DIM))


def test_trainable_bias_keeps_its_gradient():
    model, x = _pair("dilated-rel-bias")
    converted = edgeattn.convert(model, x, layout="blocked")
    _dense_reference(model, x).square().sum().backward()
    converted(x).square().sum().backward()
    torch.testing.assert_close(converted.rel.grad, model.rel.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the bias follows the weight: it is read on every call, not compiled into the table
        model.rel.add_(1.0)
        converted.rel.add_(1.0)
        torch.testing.assert_close(converted(x), model(x), atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flex")
    files = {}
    for case in ("sliding-alibi", "dilated-rel-bias", "prefix-lm-gqa"):
        model, x = _pair(case)
        with torch.no_grad():
            want = model(x).numpy()
        path = folder / f"{case}.onnx"  # the unconverted module: export converts it on the way
        result = edgeattn.export_onnx(model, [x], path, input_names=["x"], output_names=["y"])
        assert not hasattr(model, "edgeattn_flex")
        files[case] = (path, x.numpy(), want, result)
    return files


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_exported_file_matches_flex_attention(exported, runtime):
    require(runtime)
    for case, (path, x, want, _) in exported.items():
        got = edgeattn.load(path, runtime=runtime).run({"x": x})["y"]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=case)


def test_export_records_each_call_with_its_lowering(exported):
    _, _, _, result = exported["sliding-alibi"]
    assert [m["mask"] for m in result.masks] == ["sliding"]
    _, _, _, result = exported["dilated-rel-bias"]
    assert [m["mask"] for m in result.masks] == ["dilated"]


def test_plain_runtimes_run_the_file(exported, tmp_path):
    jobs = []
    for case, (path, x, want, _) in exported.items():
        np.savez(tmp_path / f"{case}.npz", x=x)
        jobs.append(
            {"name": case, "file": str(path), "feeds": str(tmp_path / f"{case}.npz"), "work": str(tmp_path / case)}
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    for consumer in ("ort", "openvino"):
        done = subprocess.run(
            [sys.executable, str(CONSUME), consumer, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads((tmp_path / "out.json").read_text())
        for case, (_, _, want, _) in exported.items():
            assert "outputs" in results[case], results[case]
            got = np.load(results[case]["outputs"])["y"]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{consumer} {case}")


def _flex_module(fn):
    class Module(nn.Module):
        def forward(self, x):
            return fn(x)

    return Module()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: flex_attention(x, x, x, score_mod=lambda s, b, h, q, kv: s * 2), "changes the score"),
        (lambda x: flex_attention(x, x, x, return_lse=True)[0], "return_lse"),
        (
            lambda x: flex_attention(
                x,
                x,
                x,
                block_mask=create_block_mask(lambda b, h, q, kv: (q >= kv) & (b == 0), 2, None, 64, 64, device="cpu"),
            ),
            "batch",
        ),
    ],
)
def test_what_cannot_be_converted_is_one_error(call, message):
    x = torch.randn(2, 2, 64, 16)
    with pytest.raises(EdgeAttnError, match=message):
        edgeattn.convert(_flex_module(call), x)


def test_a_call_that_changed_since_conversion_is_refused():
    model, x = _pair("causal")
    converted = edgeattn.convert(model, x)
    converted.block_mask = create_block_mask(sliding, None, None, N, N, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(EdgeAttnError, match="mask_mod"):
        converted(x)
    with pytest.raises(EdgeAttnError, match="query shape"):
        converted.block_mask = model.block_mask
        converted(torch.randn(2, N // 2, DIM))


def test_torch_compiled_flex_attention_is_converted_too():
    # a module-level binding, as user code has it
    global _COMPILED
    _COMPILED = torch.compile(flex_attention)
    module = _flex_module(
        lambda x: _COMPILED(
            x,
            x,
            x,
            block_mask=create_block_mask(
                causal,
                None,
                None,
                64,
                64,
                device="cpu",
            ),
        )
    )
    try:
        x = torch.randn(1, 2, 64, 16)
        converted, lines = edgeattn.convert(module, x, report=True)
        assert lines and "causal" in lines[0]
        with torch.no_grad():
            got, want = converted(x), module(x)  # the original runs the compiled flex_attention (inductor)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        del globals()["_COMPILED"]
        torch._dynamo.reset()  # leave no compiled code behind for other tests


def test_a_module_without_attention_to_convert_is_one_error():
    with pytest.raises(EdgeAttnError, match="found nothing to convert"):
        edgeattn.convert(nn.Linear(4, 4), torch.randn(1, 4))
