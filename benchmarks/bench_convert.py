"""Models users bring (FlexAttention code, NATTEN modules, transformers models): the original in eager PyTorch, its
plain torch.onnx export where one exists, and edgeattn.convert + export, side by side on ort-cpu and openvino-cpu.

    python benchmarks/bench_convert.py [--cases flex-sliding natten-na2d ...] [--runs 20] [--markdown]

Per case and path: file size, max abs error against the original module's output, median latency.  A plain export
that fails says why (its first line); one that runs but disagrees with the original is marked, since a file that
loads is not a file that is right.  One process, same inputs, same weights.
"""

import argparse
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_attention import median_ms  # 3 warm-ups, then the median of the timed runs
from torch import nn

import edgeattn
from edgeattn.convert import hf_lm
from edgeattn.models.user import PromptLogits

warnings.filterwarnings("ignore")  # uncompiled flex_attention warns on every call
RUNTIMES = ("ort-cpu", "openvino-cpu")
ATOL = 1e-4


def flex_sliding():
    """4,096 tokens, causal sliding window 256, ALiBi, 4 heads x 32: attention written with flex_attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens, dim, heads = 4096, 128, 4

    def window(b, h, q, kv):
        return (q >= kv) & (q - kv < 256)

    def alibi(score, b, h, q, kv):
        return score + 2.0 ** (-(h + 1.0)) * (kv - q)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mask = create_block_mask(window, None, None, tokens, tokens, device="cpu")

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
            return self.proj(
                flex_attention(q, k, v, score_mod=alibi, block_mask=self.mask).transpose(1, 2).reshape(B, N, C)
            )

    return Block(), (torch.randn(1, tokens, dim),)


def natten_na2d():
    """natten 0.21 NeighborhoodAttention2D, 56x56 tokens, kernel 7, dilation 2, 2 heads x 32, in a pre-norm block."""
    from natten import NeighborhoodAttention2D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.attn = NeighborhoodAttention2D(64, 2, 7, dilation=2)

        def forward(self, x):
            return x + self.attn(self.norm(x))

    return Block(), (torch.randn(1, 56, 56, 64),)


def hf_mistral():
    """transformers Mistral (sdpa), 4 layers, hidden 256, 8 heads / 2 kv heads, sliding window 128, 1,024 tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        sliding_window=128,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return MistralForCausalLM(config), (torch.randint(0, 1000, (1, 1024)),)


def hf_swin():
    """transformers SwinForImageClassification, swin-tiny config (224x224, window 7), random weights."""
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig()), (torch.randn(1, 3, 224, 224),)


CASES = {"flex-sliding": flex_sliding, "natten-na2d": natten_na2d, "hf-mistral": hf_mistral, "hf-swin": hf_swin}


def first_tensor(out):
    """The model's first output (transformers' logits) as numpy."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().numpy()


def run_file(path, feeds, want, runs):
    rows = {}
    for runtime in RUNTIMES:
        session = edgeattn.load(path, runtime=runtime)
        got = np.asarray(next(iter(session.run(feeds).values())))
        err = float(np.abs(got - want).max())
        rows[runtime] = (err, median_ms(lambda: session.run(feeds), runs))
    return rows


def measure(name, runs, folder):
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    model.eval()
    names = [f"input_{i}" for i in range(len(inputs))]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    with torch.no_grad():
        want = first_tensor(model(*inputs))
        eager_ms = median_ms(lambda: model(*inputs), max(3, runs // 4))
    out = [(name, "torch eager (original)", None, None, {"torch": (0.0, eager_ms)})]
    plain = Path(folder) / f"{name}-plain.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(model, inputs, str(plain), dynamo=True, input_names=names)
        out.append((name, "plain torch.onnx", _mb(plain), None, run_file(plain, feeds, want, runs)))
    except Exception as e:  # what a user gets without edgeattn
        out.append((name, "plain torch.onnx", None, f"export fails: {_cause(e)}", {}))
    converted = edgeattn.convert(model, *inputs)
    if hf_lm.is_causal_lm(model):  # what `edgeattn export` does with an LM: logits through the prefill tables
        converted = PromptLogits(converted)
    path = Path(folder) / f"{name}-edgeattn.onnx"
    result = edgeattn.export_onnx(converted, list(inputs), path, input_names=names)
    lowerings = ", ".join(sorted({m["lowering"] for m in result.masks}))
    out.append((name, f"edgeattn ({lowerings})", _mb(path), None, run_file(path, feeds, want, runs)))
    return out


def _cause(error: Exception) -> str:
    """The line of an exporter's long error that names what failed."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    named = [
        line
        for line in lines
        if re.search(
            r"flex_attention|Unsupported|not supported|No decomposition|"
            r"translat|Error:",
            line,
        )
    ]
    return (named or lines or [type(error).__name__])[-1][:110]


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    header = ("case", "path", "file_MB", "torch_ms", "ort_ms", "ort_err", "ov_ms", "ov_err", "note")
    table = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            for case, label, mb, note, rows in measure(name, args.runs, folder):
                cells = [case, label, _cell(mb), _cell(rows.get("torch", (None, None))[1])]
                for runtime in RUNTIMES:
                    err, ms = rows.get(runtime, (None, None))
                    cells += [_cell(ms), "-" if err is None else f"{err:.1e}" + ("" if err <= ATOL else " WRONG")]
                table.append(cells + [note or ""])
                print("  ".join(table[-1]), flush=True)
    if args.markdown:
        print("\n".join("| " + " | ".join(r) + " |" for r in [header, ("---",) * len(header), *table]))


if __name__ == "__main__":
    main()
