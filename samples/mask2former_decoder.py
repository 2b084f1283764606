"""Mask2Former's masked-attention decoder: export it, run it on every runtime, read its predictions.

The cross-attention masks come from the decoder's own previous mask predictions, so they are computed inside
the exported graph from whatever features you feed it.  Weights are random here; load a Mask2Former
checkpoint's ``sem_seg_head.predictor.*`` keys (prefix removed) with ``load_state_dict`` to use trained ones.

    python samples/mask2former_decoder.py [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import edgeattn
from edgeattn.models.mask2former import Mask2FormerDecoder


def describe(logits, masks, top=5):
    """The most confident queries: (query, class, probability, mask area as a fraction of the pixels)."""
    probs = torch.from_numpy(logits[0]).softmax(-1)[:, :-1]  # drop the last, "no object", class
    score, label = probs.max(-1)
    area = (torch.from_numpy(masks[0]).sigmoid() > 0.5).float().mean((-2, -1))
    order = score.argsort(descending=True)[:top]
    return [(int(q), int(label[q]), float(score[q]), float(area[q])) for q in order]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-m2f-"), help="output folder")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)

    # 1. The decoder at Mask2Former's own width (256 wide, 8 heads, 100 queries, 9 layers, 150 classes), fed the
    #    pixel decoder's maps of a 512x512 image: strides 32, 16, 8, and the stride-4 mask features.
    model = Mask2FormerDecoder(num_classes=150).eval()
    names = ["features_s32", "features_s16", "features_s8", "mask_features"]
    features = [torch.randn(1, 256, 512 // s, 512 // s) for s in (32, 16, 8, 4)]

    # 2. Export: each cross-attention's mask is computed in the graph, from the previous layer's predictions.
    result = edgeattn.export_onnx(
        model, features, out / "mask2former_decoder.onnx", input_names=names, output_names=["pred_logits", "pred_masks"]
    )
    print(
        f"exported {result.path} ({result.file_bytes / 1e6:.1f} MB, {len(result.masks)} masked attentions, "
        f"mask tables {result.table_bytes} bytes: the masks are computed at run time)"
    )

    # 3. Run the same file on every runtime installed here, on new features, and compare with PyTorch.
    features = [torch.randn(f.shape) for f in features]
    with torch.no_grad():
        reference = [t.numpy() for t in model(*features)]
    print(
        "torch          top queries (query, class, prob, mask area):",
        ", ".join(f"q{q} c{c} {p:.3f} {a:.0%}" for q, c, p, a in describe(*reference)),
    )
    feeds = {name: f.numpy() for name, f in zip(names, features)}
    wrong = []
    for runtime in edgeattn.runtimes.available():
        session = edgeattn.load(result.path, runtime=runtime)
        outputs = session.run(feeds)
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        error = max(np.abs(logits - reference[0]).max(), np.abs(masks - reference[1]).max())
        print(
            f"{runtime:14s} top queries (query, class, prob, mask area):",
            ", ".join(f"q{q} c{c} {p:.3f} {a:.0%}" for q, c, p, a in describe(logits, masks)),
            f"| max |diff| vs torch {error:.1e}",
        )
        if error > 1e-4:  # a mask threshold flipped at a tie goes beyond this: `edgeattn check` explains such rows
            wrong.append(runtime)
    if wrong:
        raise SystemExit(f"{', '.join(wrong)}: outputs differ from PyTorch by more than 1e-4")


if __name__ == "__main__":
    main()
