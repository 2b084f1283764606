"""The command line on a user's own model (package.module:callable or file.py:callable with --input): export,
check and bench as for the zoo, with the original module as the PyTorch reference."""

import json
import sys

import pytest

from edgeattn import cli

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

MODEL = """
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 32)


class Tiny(nn.Module):
    def __init__(self, n=128, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(100, dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mask = create_block_mask(sliding, None, None, n, n, device="cpu")

    def forward(self, ids, x):
        x = x + self.embed(ids)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(flex_attention(q, k, v, block_mask=self.mask).transpose(1, 2).reshape(B, N, C))


def build():
    return Tiny()


not_a_module = 3


def tiny_mistral():
    import transformers

    config = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    return transformers.AutoModelForCausalLM.from_config(config)
"""
INPUTS = ["--input", "ids=1x128:int64", "--input", "x=1x128x64"]


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_cli.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("user_models_for_cli", None)


def test_export_check_and_bench_a_users_model(user_file, capsys):
    assert (
        cli.main(
            [
                "export",
                "user_models_for_cli:build",
                *INPUTS,
                "-o",
                "m.onnx",
                "--check",
                "--runs",
                "2",
                "--json",
                "parity.json",
            ]
        )
        == 0
    )
    rows = json.loads((user_file / "parity.json").read_text())
    assert {r["runtime"] for r in rows} >= {"torch", "ort-cpu", "openvino-cpu"}
    assert all(r["status"] == "ok" for r in rows)
    out = capsys.readouterr().out
    assert "sliding x1" in out
    # the file names the code it came from, but check runs it only when trusted
    assert cli.main(["check", "m.onnx", "--runs", "2"]) == 0
    assert "no PyTorch reference" in capsys.readouterr().out
    assert cli.main(["check", "m.onnx", "--runs", "2", "--trust-code"]) == 0
    assert "torch " in capsys.readouterr().out
    assert (
        cli.main(
            [
                "bench",
                f"{user_file / 'user_models_for_cli.py'}:build",
                *INPUTS,
                "--lowering",
                "auto",
                "--form",
                "standard",
                "--runs",
                "2",
                "--runtime",
                "ort-cpu",
            ]
        )
        == 0
    )
    assert "auto:" in capsys.readouterr().out


def test_a_transformers_lm_exports_its_prompt_with_static_tables(user_file, capsys):
    pytest.importorskip("transformers")
    assert (
        cli.main(
            [
                "export",
                "user_models_for_cli:tiny_mistral",
                "--input",
                "input_ids=1x32:int64",
                "-o",
                "lm.onnx",
                "--check",
                "--runs",
                "2",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "sliding_window_8 x2" in out  # the window is in the file, checked against the transformers model
    assert "parity gate FAILED" not in err  # the CLI reports a failed gate on stderr (cli._report)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["user_models_for_cli:build", "-o", "a.onnx"], "needs its inputs"),
        (["user_models_for_cli:nope", *INPUTS, "-o", "a.onnx"], "has no 'nope'"),
        (["user_models_for_cli:not_a_module", *INPUTS, "-o", "a.onnx"], "is a int"),
        (["no_such_package_here:build", *INPUTS, "-o", "a.onnx"], "cannot import"),
        (["missing.py:build", *INPUTS, "-o", "a.onnx"], "no file"),
        (["user_models_for_cli:build", "--input", "ids=1xq", "-o", "a.onnx"], "positive integers"),
        (["user_models_for_cli:build", "--input", "ids=1x128:int8", "-o", "a.onnx"], "unknown dtype"),
        (["nat-mini", "--input", "x=1x2", "-o", "a.onnx"], "--input is for a model of your own"),
    ],
)
def test_bad_user_model_arguments_are_one_line(user_file, capsys, argv, message):
    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (user_file / "a.onnx").exists()
