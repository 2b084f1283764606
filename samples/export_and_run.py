"""Embed edgeattn in your own code: declare masks, build a model, export it, run it on every runtime.

python samples/export_and_run.py [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import torch

import edgeattn
from edgeattn import masks, parity
from edgeattn.layers import MaskedBlock


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-sample-"), help="output folder")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)

    # 1. Masks are pure functions: a built-in family, and a FlexAttention-style mask_mod of your own.
    grid = (16, 16)
    local = masks.neighborhood(kernel=5, dilation=2)

    def same_half(b, h, q_idx, kv_idx):  # any FlexAttention mask_mod works unchanged
        return (q_idx < 128) == (kv_idx < 128)

    model = torch.nn.Sequential(
        MaskedBlock(dim=64, heads=4, mask=local, grid=grid),
        MaskedBlock(dim=64, heads=4, mask=masks.and_masks(masks.window(8), same_half), grid=grid),
    ).eval()
    tokens = torch.randn(1, 256, 64)

    # 2. Export: attention becomes standard ONNX ops, so any runtime reads the file without edgeattn
    #    (custom_op=True keeps each as one edgeattn-domain node with its standard-op body as a local function).
    result = edgeattn.export_onnx(model, [tokens], out / "sample.onnx", input_names=["tokens"], output_names=["out"])
    print(f"exported {result.path} ({result.file_bytes / 1e3:.0f} kB, mask tables {result.table_bytes / 1e3:.0f} kB)")

    # 3. Run it: the same file on every runtime installed here.
    for name in edgeattn.runtimes.available():
        session = edgeattn.load(result.path, runtime=name)
        y = session.run({"tokens": tokens.numpy()})["out"]
        print(f"{name:14s} output {y.shape}, first values {y[0, 0, :3]}")

    # 4. Check parity and latency against PyTorch.
    results = parity.compare_model(model, [tokens], result.path)
    print(parity.format_table(results))
    if not all(r.ok for r in results):
        raise SystemExit("a runtime is out of tolerance (table above)")


if __name__ == "__main__":
    main()
