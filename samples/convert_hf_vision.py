"""transformers' Swin and Mask2Former through edgeattn.convert: export them, run them on onnxruntime and OpenVINO, and
compare with the transformers models.

Models are built from config classes with random weights (no download); ``from_pretrained`` models convert the same
way.  Convert with an input of the size you will deploy: each Swin layer's window mask is compiled for its grid.

    python samples/convert_hf_vision.py [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    Mask2FormerConfig,
    Mask2FormerModel,
    SwinConfig,
    SwinForImageClassification,
)

import edgeattn

RUNTIMES = ["ort-cpu", "openvino-cpu"]


class Outputs(nn.Module):
    """A transformers model with the outputs to export picked from its ModelOutput."""

    def __init__(self, model, *names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, pixel_values):
        out = self.model(pixel_values)
        return tuple(out[name][-1] if isinstance(out[name], tuple) else out[name] for name in self.names)


def export_and_compare(title, original, pixels, path, *names):
    """Convert, export, run every runtime, and print each one's largest difference from the original."""
    converted, lines = edgeattn.convert(original, pixels, report=True)
    print(f"{title}: {len(lines)} modules converted, e.g.\n  " + "\n  ".join(lines[:2]))
    edgeattn.export_onnx(
        Outputs(converted, *names).eval(), (pixels,), path, input_names=["pixel_values"], output_names=list(names)
    )
    with torch.no_grad():
        want = [w.numpy() for w in Outputs(original, *names)(pixels)]
    for runtime in RUNTIMES:
        got = edgeattn.load(path, runtime=runtime).run({"pixel_values": pixels.numpy()})
        errors = ", ".join(f"{n} {np.abs(g - w).max():.1e}" for n, g, w in zip(names, got.values(), want))
        print(f"  {runtime}: max abs difference from transformers: {errors}")
        if any(np.abs(g - w).max() > 1e-4 for g, w in zip(got.values(), want)):
            raise SystemExit(f"{title} on {runtime} differs from transformers by more than 1e-4")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-hf-vision-"), help="output folder")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)

    # 1. A Swin-T-shaped classifier, narrower: 224x224 image, window 7, stages of 56, 28, 14 and 7 tokens a side
    #    (the last is no larger than the window, so transformers stops shifting there; the converter follows).
    swin = SwinForImageClassification(
        SwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], num_labels=10)
    ).eval()
    export_and_compare("Swin", swin, torch.randn(1, 3, 224, 224), out / "swin.onnx", "logits")

    # 2. Mask2Former on a tiny Swin backbone: the backbone's windows and the decoder's masked cross-attention (mask
    #    = sigmoid(previous mask logits) < 0.5, computed in the graph) are both converted.
    backbone = SwinConfig(
        image_size=128,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        hidden_dim=64,
        feature_size=64,
        mask_feature_size=64,
        num_queries=20,
        encoder_layers=2,
        decoder_layers=4,
        num_attention_heads=4,
        encoder_feedforward_dim=128,
        dim_feedforward=128,
        use_pretrained_backbone=False,
    )
    mask2former = Mask2FormerModel(config).eval()
    export_and_compare(
        "Mask2Former",
        mask2former,
        torch.randn(1, 3, 128, 128),
        out / "mask2former.onnx",
        "transformer_decoder_last_hidden_state",
        "masks_queries_logits",
    )
    print(f"files in {out}")


if __name__ == "__main__":
    main()
