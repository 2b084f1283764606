"""A video diffusion block with Radial Attention: export it, run it on every runtime, compare with PyTorch.

python samples/video_block.py [--out DIR] [--frames N] [--runs N]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import edgeattn
from edgeattn import models, parity
from edgeattn.layers import MaskTable


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-video-"), help="output folder")
    parser.add_argument("--frames", type=int, default=32, help="latent frames of 8x16 tokens (default 32)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per runtime")
    args = parser.parse_args()
    out = Path(args.out)

    # 1. The registered reference block: DiT adaLN-Zero block, radial mask over frames x tokens (Wan: sink, block 64).
    built = models.build("radial-block", frames=args.frames)
    block, inputs = built.module, built.inputs  # {"tokens": (1, frames*128, 64), "c": (1, 64)}
    [table] = [m for m in block.modules() if isinstance(m, MaskTable)]
    dense_bytes = table.shape.q_len * table.shape.kv_len * 4  # what a float mask of the same attention would ship
    print(
        f"mask {table.mask.name}: {table.shape.q_len} tokens, keeps {table.table.density:.1%} of the pairs; "
        f"{table.layout} table {table.table_bytes / 1e6:.2f} MB (a dense float mask: {dense_bytes / 1e6:.0f} MB)"
    )
    if table.layout == "blocked":
        print(f"  block table scores {table.table.work_fraction:.1%} of the dense scores")

    # 2. Export: the attention becomes the standard ONNX ops of its lowering (custom_op=True keeps one edgeattn node).
    path = out / "video_block.onnx"
    result = edgeattn.export_onnx(
        block, list(inputs.values()), path, input_names=list(inputs), output_names=list(built.outputs)
    )
    print(
        f"exported {result.path} ({result.file_bytes / 1e6:.2f} MB, mask tables {result.table_bytes / 1e6:.2f} MB, "
        f"lowering {result.masks[0]['lowering']})"
    )

    # 3. Run the file on every runtime installed here, the way an application would.
    feeds = {name: t.numpy() for name, t in inputs.items()}
    with torch.no_grad():
        reference = block(**inputs).numpy()
    for name in edgeattn.runtimes.available():
        session = edgeattn.load(result.path, runtime=name)
        y = session.run(feeds)[built.outputs[0]]
        print(f"{name:14s} output {y.shape}, max |y - torch| = {np.abs(y - reference).max():.2e}")

    # 4. Parity and latency against eager PyTorch (p50/p90 after warm-up).
    results = parity.compare_model(block, list(inputs.values()), result.path, runs=args.runs)
    print(parity.format_table(results))
    if not all(r.ok for r in results):
        raise SystemExit("a runtime is out of tolerance (table above)")


if __name__ == "__main__":
    main()
