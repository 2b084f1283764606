"""Bring a NATTEN model: convert its neighborhood-attention modules, export to ONNX, run it on onnxruntime.

    pip install --no-build-isolation natten==0.21.7
    python samples/convert_natten.py [--out DIR]

NATTEN has no ONNX path and, since 0.20, no CPU kernels of its own (it runs here through FlexAttention, unfused).
`edgeattn.convert` swaps each NeighborhoodAttention1D/2D/3D for an edgeattn layer holding the same qkv / proj
weights, with the grid the module sees on the example input; the exported file needs only onnxruntime.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from natten import NeighborhoodAttention2D
from torch import nn

import edgeattn

# NATTEN runs on CPU through uncompiled FlexAttention, which warns that it is unfused and that NATTEN's return_lse
# is deprecated: it is the reference here, not the deployment
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
warnings.filterwarnings("ignore", message="return_lse is deprecated")


class Block(nn.Module):
    """Pre-norm transformer block around a NATTEN module, tokens as (B, H, W, C)."""

    def __init__(self, dim, heads, kernel, dilation):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(dim, heads, kernel, dilation=dilation)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-natten-"), help="output folder")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)

    # 1. A small DiNAT-style model built from NATTEN modules: patch embedding, k7 and k7 dilation 2 blocks, head.
    model = nn.Sequential(
        nn.Conv2d(3, 64, 4, stride=4),
        Permute(0, 2, 3, 1),
        Block(64, 4, 7, 1),
        Block(64, 4, 7, 2),
        nn.LayerNorm(64),
        nn.Linear(64, 10),
    ).eval()
    image = torch.randn(1, 3, 112, 112)
    with torch.no_grad():  # NATTEN's CPU path (FlexAttention) runs without autograd only
        reference = model(image).numpy()

        # 2. Convert: the grid (28x28 here) comes from running the model once on the example input.
        converted, lines = edgeattn.convert(model, image, report=True)
    print("\n".join(lines))

    # 3. Export, then run with plain onnxruntime: nothing of edgeattn or natten is needed on the device.
    path = edgeattn.export_onnx(
        converted, [image], out / "dinat_small.onnx", input_names=["image"], output_names=["logits"]
    ).path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": image.numpy()})[0]
    error = float(np.abs(logits - reference).max())
    print(f"{path}: onnxruntime vs NATTEN max abs error {error:.2e}")
    if error > 1e-4:
        raise SystemExit("the exported model does not match NATTEN's output")


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


if __name__ == "__main__":
    main()
