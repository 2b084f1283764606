"""Content-routed block-sparse attention with a router of your own: MoBA's mechanism, your scores.

    python samples/routed_attention.py [--out DIR]

A router is a function of q (B, H, N, D) and the keys mean-pooled per block (B, H, N / block, D) that returns block
scores, one row per query (B, H, N, nb) or per query block (B, H, N / block, nb).  edgeattn masks the blocks a query
may not take (later blocks with ``causal``; its own block, which it always attends), takes the ``top_k - 1`` best,
and scores only those.  The router is traced into the exported graph, so the file chooses blocks at run time on
every runtime, without edgeattn.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import edgeattn
from edgeattn.routing import pool_blocks, routed_attention


def mean_query_router(q, pooled_k):
    """One choice per query block: the block's mean query against each block's mean key (scaled dot product)."""
    block = q.shape[2] // pooled_k.shape[2]
    return torch.matmul(pool_blocks(q, block), pooled_k.transpose(-1, -2)) * q.shape[-1] ** -0.5


class RoutedBlock(nn.Module):
    def __init__(self, dim=64, heads=2, block=64, top_k=3):
        super().__init__()
        self.heads, self.block, self.top_k = heads, block, top_k
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = routed_attention(q, k, v, self.block, self.top_k, causal=True, router=mean_query_router)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-routed-"), help="output folder")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)
    model, x = RoutedBlock().eval(), torch.randn(1, 2048, 64)
    result = edgeattn.export_onnx(model, [x], out / "routed.onnx", input_names=["x"], output_names=["y"])
    print(f"exported {result.path}: {result.masks[0]['mask']} -> {result.masks[0]['lowering']}")
    # the file in plain onnxruntime, as a device runs it
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    error = float(np.abs(got - want).max())
    print(f"onnxruntime vs PyTorch: max abs error {error:.1e}")
    if error > 1e-4:
        raise SystemExit("routed attention does not match PyTorch")


if __name__ == "__main__":
    main()
