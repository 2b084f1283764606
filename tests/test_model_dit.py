"""radial-block and clear-block: DiT blocks with static sparse masks, exported and checked on onnxruntime and
OpenVINO."""

import subprocess
import sys

import pytest
import torch

from edgeattn import materialize, models, parity
from edgeattn.attention import reference_attention
from edgeattn.layers import MaskTable
from edgeattn.masks import clear
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES

NAMES = ["radial-block", "clear-block"]
ATOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    return {name: export_registered(name, folder / f"{name}.onnx") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_export_matches_torch_on_cpu_runtimes(files, name):
    result = files[name]
    # auto: both masks are sparse enough; radial's scores outgrow the cache, so its block table runs in chunks
    assert {m["lowering"] for m in result.masks} == {"blocked"}
    assert (len(result.masks) > 1) == (name == "radial-block")
    rows = parity.check_file(result.path, CPU_RUNTIMES, runs=1)
    assert [r.runtime for r in rows] == CPU_RUNTIMES
    for r in rows:
        assert r.ok and r.max_abs_err <= ATOL, parity.format_table(rows)


def test_cli_export_check_exits_zero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeattn",
            "export",
            "clear-block",
            "-o",
            str(tmp_path / "x.onnx"),
            "--check",
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "openvino-cpu  ok" in proc.stdout and "ort-cpu       ok" in proc.stdout


def test_radial_block_uses_the_radial_table():
    built = models.build("radial-block")
    [table] = [m for m in built.module.modules() if isinstance(m, MaskTable)]
    assert table.mask.name == "radial_f32_b64_sink" and table.layout == "bucketed"  # a block table in chunks
    assert all(b.layout == "blocked" for b in table.table.buckets)
    assert built.inputs["tokens"].shape == (1, 32 * 8 * 16, 64) and built.inputs["c"].shape == (1, 64)


def test_clear_split_attention_is_one_attention_over_the_joint_sequence():
    """Text queries unmasked + image queries through the CLEAR table == one attention with CLEAR's full mask."""
    text, image, radius = 5, (6, 7), 3
    built = models.build("clear-block", text=text, image=list(image), radius=radius)
    attn = built.module.block.attn
    x = torch.randn(2, text + 42, 64)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
    full = materialize(clear(radius, text=text, image=image), q_len=N)
    expected = attn.proj(
        reference_attention(q, k, v, full, None, scale=(C // attn.heads) ** -0.5).transpose(1, 2).reshape(B, N, C)
    )
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zero_modulation_makes_the_block_an_identity(name):
    """adaLN-Zero: with DiT's zero-initialised modulation both gates are 0 and the block returns its input."""
    built = models.build(name, **({"frames": 4} if name == "radial-block" else {}))
    dit = built.module.block
    torch.nn.init.zeros_(dit.adaLN_modulation[1].weight)
    torch.nn.init.zeros_(dit.adaLN_modulation[1].bias)
    with torch.no_grad():
        out = built.module(**built.inputs)
    tokens = [v for k, v in built.inputs.items() if k != "c"]
    for got, want in zip(out if isinstance(out, tuple) else (out,), tokens):
        assert torch.equal(got, want)


def test_bad_inputs_are_clear_errors():
    built = models.build("clear-block", text=2, image=[4, 4], radius=2)
    text, image, c = built.inputs["text"], built.inputs["image"], built.inputs["c"]
    with pytest.raises(ValueError, match="conditioning c must be"):
        built.module(text, image, c[:, :10])
    with pytest.raises(ValueError, match="takes 2 text tokens and 16 image tokens"):
        built.module(text, image[:, :15], c)
