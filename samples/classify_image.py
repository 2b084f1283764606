"""Image classification with a masked-attention backbone: export a reference model, classify on each runtime.

    python samples/classify_image.py [--model nat-mini|dinat-mini|swin-t|rmt-t|ppma-t|nat-tiny] [--image F.npy]
                                     [--checkpoint F.pth] [--dtype fp32|fp16] [--out DIR]

The weights are random (seeded) unless --checkpoint names the reference repository's checkpoint: the models use
its state-dict keys, so ``model.load_state_dict(torch.load(path)["model"])`` loads it.  --image takes a
(3, H, W) float array already normalized with the ImageNet mean and std; without it a random image is used.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgeattn
from edgeattn import models, parity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nat-mini", help="registered vision classifier (default nat-mini)")
    parser.add_argument("--image", help="a normalized (3, H, W) float .npy image at the model's input size")
    parser.add_argument("--checkpoint", help="the reference repository's checkpoint (.pth)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="precision of the exported file")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-classify-"), help="output folder")
    args = parser.parse_args()

    built = models.build(args.model)
    ((input_name, example),) = built.inputs.items()
    model = built.module
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu")
        model.load_state_dict(state.get("model", state))  # strict: every key must match the reference's
    image = torch.from_numpy(np.load(args.image)).float()[None] if args.image else example
    if image.shape != example.shape:
        raise SystemExit(f"--image must have shape {tuple(example.shape[1:])}, got {tuple(image.shape[1:])}")

    # 1. Export: one file of standard ONNX ops (each attention blocked where its mask is sparse).
    path = Path(args.out) / f"{args.model}.onnx"
    start = time.perf_counter()
    result = edgeattn.export_onnx(
        model, [image], path, input_names=[input_name], output_names=list(built.outputs), dtype=args.dtype
    )
    print(
        f"exported {path} in {time.perf_counter() - start:.1f} s: {result.file_bytes / 1e6:.1f} MB, "
        f"{len(result.masks)} attention nodes, mask tables {result.table_bytes / 1e6:.2f} MB"
    )

    # 2. Classify on each runtime installed here, next to PyTorch.
    with torch.no_grad():
        reference = model(image).numpy()
    print(f"{'torch':14s} top-5 {np.argsort(-reference[0])[:5].tolist()}")
    # within rounding of PyTorch: fp32 1e-4 of the largest logit, fp16 2e-2 (edgeattn's own tolerances)
    tolerance = (1e-4 if args.dtype == "fp32" else 2e-2) * max(1.0, float(np.abs(reference).max()))
    wrong = []
    for name in edgeattn.runtimes.available():
        session = edgeattn.load(path, runtime=name)
        logits = session.run({input_name: image.numpy()})[built.outputs[0]]
        p50, _ = parity.latency(lambda: session.run({input_name: image.numpy()}), runs=10)
        same = np.array_equal(np.argsort(-logits[0])[:5], np.argsort(-reference[0])[:5])
        print(
            f"{name:14s} top-5 {np.argsort(-logits[0])[:5].tolist()} ({'same as' if same else 'DIFFERS from'} "
            f"torch), max |logit diff| {np.abs(logits - reference).max():.1e}, {p50:.1f} ms"
        )
        if np.abs(logits - reference).max() > tolerance:
            wrong.append(name)
    if wrong:
        raise SystemExit(f"{', '.join(wrong)}: logits differ from PyTorch by more than {tolerance:.1e}")


if __name__ == "__main__":
    main()
