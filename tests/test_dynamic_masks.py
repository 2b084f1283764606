"""Masks and biases the model computes from its inputs (Mask2Former's predicted masks, PPMA's selective decays):
the graph computes them at run time and every dense-table lowering takes them with a batch axis."""

import pytest
import torch
from torch import nn

from edgeattn import export_onnx, onnxfile, parity
from edgeattn.attention import masked_attention

from conftest import CPU_RUNTIMES


class PredictedMaskAttention(nn.Module):
    """Attention whose mask and bias are functions of the inputs: (B, H, Nq, Nkv), one row fully masked."""

    def __init__(self, heads=2, dim=16):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.mask_logits = nn.Linear(dim, 1)

    def forward(self, q, kv):
        B, Nq, C = q.shape
        qh = q.reshape(B, Nq, self.heads, -1).transpose(1, 2)
        kh = kv.reshape(B, kv.shape[1], self.heads, -1).transpose(1, 2)
        logits = self.mask_logits(kv).squeeze(-1)  # (B, Nkv)
        mask = (logits[:, None, None, :] + qh.sum(-1, keepdim=True)) > 0  # (B, H, Nq, Nkv)
        mask = mask & (torch.arange(Nq) != 0).view(1, 1, Nq, 1)  # query 0 attends nothing
        bias = -(logits.abs()[:, None, None, :] * torch.arange(1, Nq + 1).view(1, 1, Nq, 1))
        return masked_attention(qh, kh, kh, mask, bias.expand(B, self.heads, Nq, -1))


@pytest.mark.parametrize(
    "lowering,opset,targets",
    [
        ("auto", 18, None),
        ("dense", 18, None),
        ("blocked", 18, None),
        ("attention", 23, None),
        ("contrib", 18, ["ort-cpu"]),
    ],
)
def test_masks_computed_in_the_graph_export_with_every_lowering(tmp_path, lowering, opset, targets):
    model = PredictedMaskAttention().eval()
    q, kv = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    out = model(q, kv)
    assert torch.isfinite(out).all() and (out[:, :, 0] == 0).all()
    path = tmp_path / "m.onnx"
    result = export_onnx(
        model,
        [q, kv],
        path,
        opset=opset,
        lowering=lowering,
        runtimes=targets,
        input_names=["q", "kv"],
        output_names=["y"],
    )
    [node] = result.masks
    expected = {"auto": "dense", "blocked": "dense"}.get(lowering, lowering)
    assert node["lowering"] == expected and node["table_bytes"] == 0
    assert ("computed in the graph" in node["why"]) == (lowering in ("auto", "blocked"))
    assert onnxfile.read_metadata(__import__("onnx").load(str(path)))["masks"][0]["lowering"] == expected
    # other inputs give other masks: the mask is not a constant of the file
    for inputs in ([q, kv], [torch.randn(2, 6, 16), torch.randn(2, 9, 16)]):
        results = parity.compare_model(model, inputs, path, targets or CPU_RUNTIMES, runs=1)
        assert all(r.ok and r.max_abs_err <= 1e-5 for r in results), parity.format_table(results)
