"""edgeattn.convert on NATTEN modules, against the originals' own outputs.

natten 0.21 runs here on CPU through its flex backend (uncompiled, without autograd: hence no_grad); its modules are
compared directly.  The 0.14-0.17 API (SHI-Labs' NAT / DiNAT checkpoints, ``rpb``) cannot be installed next to
today's torch: :func:`legacy` builds modules with its constructor, attributes and forward layout, computing
attention by brute force from the reference loops (tests/reference: NATTEN's neighborhoods and rpb indices).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeattn
from edgeattn import EdgeAttnError, runtimes
from edgeattn.convert.natten import NeighborhoodAttention

from conftest import CPU_RUNTIMES, require
from reference.masks import ref_neighborhood
from reference.rpb import natten_index_loop

# NATTEN's CPU path is its flex backend run uncompiled, the reference these tests compare with
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

if os.environ.get("CI"):
    import natten
else:
    natten = pytest.importorskip("natten", reason="pip install --no-build-isolation natten==0.21.7")

CONSUME = Path(__file__).resolve().parents[1] / "deploy" / "consume.py"
DIM, HEADS = 32, 2


# ----------------------------------------------------------------------------- the 0.14-0.17 API, brute force
class _LegacyNeighborhoodAttention(nn.Module):
    """NATTEN <= 0.17's module: (B, *grid, C) in and out; q * scale, q k^T + rpb over the neighborhood, softmax,
    attention dropout, v, proj, proj dropout.  ``kernel_size_d`` / ``dilation_d``: 0.14's 3-D depth arguments."""

    ndim = 0

    def __init__(
        self,
        dim,
        num_heads,
        kernel_size,
        dilation=1,
        is_causal=False,
        bias=True,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        kernel_size_d=None,
        dilation_d=None,
    ):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size, self.dilation, self.is_causal = kernel_size, dilation, is_causal
        if kernel_size_d is not None:
            self.kernel_size_d, self.dilation_d = kernel_size_d, dilation_d
            kernel_size, dilation = (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)
        self.kernels = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * self.ndim
        self.dilations = dilation if isinstance(dilation, tuple) else (dilation,) * self.ndim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.randn(num_heads, *[2 * k - 1 for k in self.kernels])) if bias else None
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(proj_drop)

    def forward(self, x):
        B, *size, C = x.shape  # 0.14 zero-pads axes shorter than kernel x dilation at the end, then crops
        x = nn.functional.pad(
            x,
            [0, 0]
            + [
                p
                for k, d, n in zip(self.kernels[::-1], self.dilations[::-1], size[::-1])
                for p in (0, max(0, k * d - n))
            ],
        )  # (before, after) pairs: C, W, H..
        grid, n = x.shape[1:-1], math.prod(x.shape[1:-1])
        q, k, v = self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        allowed = torch.tensor(ref_neighborhood(tuple(grid), self.kernels, self.dilations, 1, self.is_causal))
        if self.rpb is not None:
            index = natten_index_loop(tuple(grid), self.kernels, self.dilations)
            assert torch.equal(index >= 0, allowed)
            scores = scores + self.rpb.flatten(1)[:, index.clamp(min=0)]
        attn = self.attn_drop(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
        out = (attn @ v).transpose(1, 2).reshape(B, *grid, C)[(slice(None), *map(slice, size))]
        return self.proj_drop(self.proj(out))


# named as NATTEN's classes: convert recognises the old API by class name and attributes
LEGACY = {n: type(f"NeighborhoodAttention{n}D", (_LegacyNeighborhoodAttention,), {"ndim": n}) for n in (1, 2, 3)}


def legacy(ndim, *args, **kwargs):
    return LEGACY[ndim](DIM, HEADS, *args, **kwargs)


# ----------------------------------------------------------------------------- single modules, eager
MODULES = {  # id -> (constructor, grid)
    "1d-k5": (lambda: natten.NeighborhoodAttention1D(DIM, HEADS, 5), (20,)),
    "1d-k4-s2-causal": (lambda: natten.NeighborhoodAttention1D(DIM, HEADS, 4, stride=2, is_causal=True), (20,)),
    "2d-k7-d2": (lambda: natten.NeighborhoodAttention2D(DIM, HEADS, 7, dilation=2), (14, 14)),
    "2d-k4x5-s2x1-causal10": (
        lambda: natten.NeighborhoodAttention2D(
            DIM, HEADS, (4, 5), stride=(2, 1), is_causal=(True, False), qk_scale=0.3
        ),
        (10, 12),
    ),
    "3d-k3-d1x1x2": (lambda: natten.NeighborhoodAttention3D(DIM, HEADS, 3, dilation=(1, 1, 2)), (4, 5, 6)),
    "3d-k2x3x3-s1x2x3-causal": (
        lambda: natten.NeighborhoodAttention3D(DIM, HEADS, (2, 3, 3), stride=(1, 2, 3), is_causal=True, qkv_bias=False),
        (4, 5, 6),
    ),
    "legacy-1d-k5-d2-rpb": (lambda: legacy(1, 5, dilation=2), (20,)),
    "legacy-2d-k5-d2-rpb": (lambda: legacy(2, 5, dilation=2), (14, 14)),
    "legacy-2d-k3x5-causal": (lambda: legacy(2, (3, 5), dilation=(1, 2), is_causal=(False, True), bias=False), (9, 12)),
    "legacy-3d-depth-args-rpb": (lambda: legacy(3, 3, dilation=2, kernel_size_d=3, dilation_d=1), (4, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(MODULES))
def test_converted_module_matches_the_original(case):
    make, grid = MODULES[case]
    model = nn.Sequential(make()).eval()
    x = torch.randn(2, *grid, DIM)
    with torch.no_grad():
        want = model(x)
        converted, lines = edgeattn.convert(model, x, report=True)
        got = converted(x)
    assert isinstance(converted[0], NeighborhoodAttention)
    assert len(lines) == 1 and lines[0].startswith(f"0: natten.{type(model[0]).__name__}")
    assert f"({'x'.join(map(str, grid))}, " in lines[0]
    assert converted.state_dict().keys() == model.state_dict().keys()  # qkv, proj, rpb: checkpoints load
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_layout_shared_module_and_grads():
    shared = legacy(2, 3, dilation=2)
    model = nn.Sequential(shared, shared)  # one module under two names: replaced under both by one layer
    x = torch.randn(1, 8, 8, DIM)
    converted, lines = edgeattn.convert(model.eval(), x, layout="dense", report=True)
    assert [line.split(":")[0] for line in lines] == ["0", "1"] and converted[0] is converted[1]
    assert converted[0].table.layout == "dense" and "(8x8, dense)" in lines[0]
    converted.train()
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)
    converted(x).square().sum().backward()  # the replaced layer trains: rpb gets its gradient through the table
    assert converted[0].rpb.grad is not None and converted[0].rpb.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- a bare module, converted and exported
BARE = {  # id -> (constructor, grid): the module itself given to convert
    "1d-k3": (lambda: natten.NeighborhoodAttention1D(DIM, HEADS, 3), (8,)),
    "2d-k3-d2": (lambda: natten.NeighborhoodAttention2D(DIM, HEADS, 3, dilation=2), (6, 6)),
    "3d-k3": (lambda: natten.NeighborhoodAttention3D(DIM, HEADS, 3), (3, 4, 4)),
    "legacy-2d-k3-rpb": (lambda: legacy(2, 3), (6, 6)),
}


@pytest.mark.parametrize("case", sorted(BARE))
def test_bare_module_converts_to_its_replacement_and_exports(case, tmp_path):
    make, grid = BARE[case]
    module = make().eval()
    x = torch.randn(1, *grid, DIM)
    with torch.no_grad():
        want = module(x)
        converted, lines = edgeattn.convert(module, x, report=True)
        got = converted(x)
    assert isinstance(converted, NeighborhoodAttention) and not converted.training
    assert len(lines) == 1 and lines[0].startswith(f"(module): natten.{type(module).__name__}")
    assert f"({'x'.join(map(str, grid))}, " in lines[0]
    assert converted.state_dict().keys() == module.state_dict().keys()
    assert converted.qkv is not module.qkv  # a copy: the original is untouched
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    path = edgeattn.export_onnx(converted, [x], tmp_path / "na.onnx", input_names=["x"], output_names=["y"]).path
    require("ort-cpu")
    y = edgeattn.load(path, "ort-cpu").run({"x": x.numpy()})["y"]
    assert float(np.abs(y - want.numpy()).max()) <= runtimes.get("ort-cpu").tolerance().atol


def test_bare_module_inplace_shares_its_weights():
    module, x = natten.NeighborhoodAttention2D(DIM, HEADS, 3).eval(), torch.randn(1, 6, 6, DIM)
    with torch.no_grad():
        want = module(x)
        converted = edgeattn.convert(module, x, inplace=True)
        # the object given cannot become another class: it stays as it was, the result holds its own Linears
        assert type(module) is natten.NeighborhoodAttention2D and converted.qkv is module.qkv
        torch.testing.assert_close(converted(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x), want)
    with pytest.raises(EdgeAttnError, match=r"pass the inputs it will be exported with, convert\(module, \*inputs\)"):
        edgeattn.convert(module)


# ----------------------------------------------------------------------------- a NAT-like model, exported
class TinyNAT(nn.Module):
    """Linear embedding, two pre-norm neighborhood-attention blocks, LayerNorm, Linear head: (B, H, W, 8) -> 10."""

    def __init__(self, first, second):
        super().__init__()
        self.embed, self.norm1, self.attn1 = nn.Linear(8, DIM), nn.LayerNorm(DIM), first
        self.norm2, self.attn2 = nn.LayerNorm(DIM), second
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x))
        return self.head(self.norm(x))


MODELS = {
    "natten": lambda: TinyNAT(
        natten.NeighborhoodAttention2D(DIM, HEADS, 5), natten.NeighborhoodAttention2D(DIM, HEADS, 3, dilation=2)
    ),
    "legacy": lambda: TinyNAT(legacy(2, 5), legacy(2, 3, dilation=2)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model converted and exported: name -> (original output, converted output, file, input, lines)."""
    folder, out = tmp_path_factory.mktemp("natten"), {}
    for name, make in MODELS.items():
        torch.manual_seed(1)
        model, x = make().eval(), torch.randn(2, 14, 14, 8)
        with torch.no_grad():
            want = model(x)
            converted, lines = edgeattn.convert(model, x, report=True)
            got = converted(x)
        path = edgeattn.export_onnx(converted, [x], folder / f"{name}.onnx", input_names=["x"], output_names=["y"]).path
        out[name] = (want, got, path, x, lines)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_converts_and_runs_on_cpu_runtimes(exported, name):
    want, got, path, x, lines = exported[name]
    suffix = " (0.14-0.17 API)" if name == "legacy" else ""
    mask = "neighborhood_k3_d2" + ("_rpb" if name == "legacy" else "")
    assert lines[1].startswith(f"attn2: natten.NeighborhoodAttention2D{suffix} -> edgeattn {mask} (14x14, ")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for runtime in CPU_RUNTIMES:
        require(runtime)
        y = edgeattn.load(path, runtime).run({"x": x.numpy()})["y"]
        err = float(np.abs(y - want.numpy()).max())
        assert err <= runtimes.get(runtime).tolerance().atol, f"{runtime}: max error {err}"


@pytest.mark.parametrize("consumer", ["ort", "openvino"])
def test_files_run_without_edgeattn(exported, tmp_path, consumer):
    """Plain onnxruntime / plain OpenVINO in a process where importing edgeattn fails (tests/deploy/consume.py)."""
    jobs = []
    for name, (want, _, path, x, _) in exported.items():
        np.savez(tmp_path / f"{name}.npz", x=x.numpy())
        jobs.append(
            {"name": name, "file": str(path), "feeds": str(tmp_path / f"{name}.npz"), "work": str(tmp_path / name)}
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(CONSUME), consumer, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    for name, (want, *_) in exported.items():
        assert "outputs" in results[name], results[name]
        y = np.load(results[name]["outputs"])["y"]
        assert float(np.abs(y - want.numpy()).max()) <= 1e-4, name


# ----------------------------------------------------------------------------- bad input: one clear error
class Calls(nn.Module):
    """Holds ``attn`` and runs it as ``run(attn, x)`` says (twice at two sizes, not at all...)."""

    def __init__(self, attn, run):
        super().__init__()
        self.attn, self.run = attn, run

    def forward(self, x):
        return self.run(self.attn, x)


class OwnForward(natten.NeighborhoodAttention2D):
    def forward(self, x):
        return super().forward(x) * 2


def _error(model, x) -> str:
    with pytest.raises(EdgeAttnError) as info:
        edgeattn.convert(model.eval(), x)
    return str(info.value)


def test_errors_name_the_module_and_the_fix():
    x = torch.randn(1, 6, 6, DIM)
    # NATTEN 0.14 zero-pads inputs smaller than kernel x dilation; refused rather than computed differently
    message = _error(nn.Sequential(legacy(2, 3, dilation=3)), x)
    assert message.startswith("0: grid 6x6 is smaller than kernel x dilation 9x9") and "pads" in message
    odd = legacy(2, 3)
    odd.rpb = nn.Parameter(torch.zeros(HEADS, 9, 9))  # runs (indices fit) but is not a k=3 table
    assert "0: NeighborhoodAttention2D.rpb must be a (heads, 2k-1, ...) table of shape (2, 5, 5)" in _error(
        nn.Sequential(odd), x
    )
    message = _error(Calls(legacy(2, 3), lambda attn, x: attn(x[:, :4, :4]).sum() + attn(x).sum()), x)
    assert message.startswith("attn: ran on several grids (4x4, 6x6)")
    message = _error(Calls(legacy(2, 3), lambda attn, x: x), x)
    assert message.startswith("attn: this NeighborhoodAttention2D did not run")
    assert "takes one (B, H, W, C) tensor" in _error(Calls(legacy(2, 3), lambda attn, x: attn(x[0])), x)
    message = _error(Calls(natten.NeighborhoodAttention2D(DIM, HEADS, 7), lambda attn, x: attn(x)), x)
    assert "that run failed (in or after attn): ValueError: The product of kernel size and dilation" in message
    assert "overrides forward" in _error(nn.Sequential(OwnForward(DIM, HEADS, 3)), x)
    with pytest.raises(EdgeAttnError, match="attention dropout .p=0.1. in training mode"):
        edgeattn.convert(nn.Sequential(legacy(2, 3, attn_drop=0.1)).train(), x)


def test_converted_layer_refuses_other_grids_and_training_without_attention_dropout():
    x = torch.randn(1, 6, 6, DIM)
    converted = edgeattn.convert(nn.Sequential(legacy(2, 3, attn_drop=0.1)).eval(), x)
    with pytest.raises(ValueError, match=r"converted for \(B, 6, 6, C\) inputs, got shape \(1, 8, 8, 32\)"):
        converted(torch.randn(1, 8, 8, DIM))
    with pytest.raises(ValueError, match="attention dropout p=0.1"):
        converted.train()(x)
