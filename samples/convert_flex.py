"""Bring FlexAttention code: a block written with flex_attention (sliding window + ALiBi), exported to ONNX as it
is, run on onnxruntime and OpenVINO and compared with torch's own flex_attention.

    python samples/convert_flex.py [--out DIR]

torch.onnx cannot export flex_attention; edgeattn.export_onnx converts each call to a static mask table on the way.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import edgeattn

TOKENS, DIM, HEADS, WINDOW = 1024, 128, 4, 128


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def alibi(score, b, h, q_idx, kv_idx):
    return score + 2.0 ** (-(h + 1.0)) * (kv_idx - q_idx)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.block_mask = create_block_mask(sliding_window, None, None, TOKENS, TOKENS, device="cpu")

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        y = flex_attention(q, k, v, score_mod=alibi, block_mask=self.block_mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the .onnx file (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(1, TOKENS, DIM)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that uncompiled flex_attention is unfused: it is the reference
        want = model(x).numpy()  # torch's own flex_attention
    folder = args.out or Path(tempfile.mkdtemp(prefix="edgeattn-flex-"))
    folder.mkdir(parents=True, exist_ok=True)
    result = edgeattn.export_onnx(model, [x], folder / "block.onnx", input_names=["x"], output_names=["y"])
    for m in result.masks:
        print(f"{m['mask']}: {m['lowering']} ({m['why']})")
    for runtime in ("ort-cpu", "openvino-cpu"):
        got = edgeattn.load(result.path, runtime=runtime).run({"x": x.numpy()})["y"]
        print(f"{runtime}: max abs err against flex_attention {np.abs(got - want).max():.2e}")
        assert np.allclose(got, want, atol=1e-4)
    print(f"wrote {result.path}")


if __name__ == "__main__":
    main()
