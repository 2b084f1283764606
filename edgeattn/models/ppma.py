"""``ppma-t``: Polyline Path Masked Attention ViT, tiny (PPMA-T), for 224x224 ImageNet images.

Reference: Zhao et al., "Polyline Path Masked Attention for Vision Transformer" (NeurIPS 2025),
github.com/zhongchenzhao/PPMA, ``classification/models/PPMA.py`` (PPMAViT, PPMAViT_T, BasicLayer, BasicBlock,
MambaAttentionChunkDouble, MambaAttentionAllDouble, PathEmbeding2D, RotaryPositionEmbedding2D).  PPMA is RMT
(github.com/qhfan/RMT, ``classfication_release/RMT.py``) with RMT's static Manhattan decay replaced by the
polyline path mask; the stem, LePE, FFN, patch merging and head are RMT's.

What it computes, as the reference does:

- stem: four 3x3 convs (stride 2, 1, 2, 1) with BatchNorm and GELU -> 56x56 tokens; stages of blocks, each
  stage but the last followed by a stride-2 3x3 conv + BatchNorm; then Linear to 1024, BatchNorm, SiLU, global
  average pool and the classifier;
- block: ``x += dwconv3x3(x)``; ``x += attn(LN(x))``; ``x += ffn(LN(x))`` (LN eps 1e-6; FFN: fc1, GELU,
  ``+ dwconv3x3`` of itself, fc2);
- attention: q, k, v projections; keys scaled by head_dim^-0.5; a rotary "theta shift" of q and k by the flat
  token index (angles ``10000^-linspace(0, 1, head_dim/2)``, each repeated for a pair of channels); LePE (5x5
  depthwise conv of v) added to the attention output before the output projection;
- selective decays from the block's normalized input ``x`` (split per head): ``(alpha, beta) = Linear(x_head)``
  (head_dim -> 2, no bias, shared by the heads), ``alpha, beta <- softplus(. + dt_bias) * -exp(A_log)``: alpha
  decays along rows, beta along columns (see ``edgeattn.masks.polyline``);
- full mode (stages 3-4): ``P = 0.5 softmax(QK^T + M) + 0.5 softmax(QK^T + M^T)`` with M the 2-D polyline mask
  (query's row, then key's column); chunk mode (stages 1-2): row attention with each row's 1-D mask and column
  attention with each column's, applied as ``0.5 col(row(v)) + 0.5 row(col(v))``.

PPMA-T: dims 64/128/256/512, depths 2/2/8/2, heads 4/4/8/16, FFN ratio 3, chunk mode in stages 1-2, no layer
scale.  The reference also passes RMT's ``init_values`` / ``heads_ranges``; PPMA stores but never uses them (its
rotary module has no decay), so they are not parameters here.  The model runs on any image size: the masks follow
the feature map.

Every softmax is one ``edgeattn.attention.masked_attention`` call with the decay mask as a bias computed in the
graph and an all-true mask: 2 nodes per full block, 4 per chunk block.  The reference computes each row/column
softmax once and multiplies it into two value tensors; here each node applies one softmax to one value tensor
(the same numbers; the chunk stages score q k^T twice).  Nothing of size N x N is stored in the exported file.
Parameter and buffer names follow the reference's state dict (``layers.{i}.blocks.{j}.retention.path_embed.A_log``
...), so the official checkpoint loads with ``strict=True``.  Initialisation is the reference's (truncated normal
Linear weights, Mamba-style ``dt_bias`` / ``A_log``).  Inference only: drop path (training) is not modelled.

Tolerance: the default fp32 gate (1e-4 absolute) holds against eager PyTorch on onnxruntime and OpenVINO with a wide
margin (benchmarks/RESULTS.md, 2026-12-01 (zoo models beside their peers)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import masked_attention
from ..errors import InvalidArgument
from ..layers import check_heads, init_linear
from ..masks.polyline import line_biases, polyline_bias
from .common import image_inputs
from .registry import register

# identical in the reference (PPMA.py keeps RMT's code for these): the stem, depthwise convs / LePE, FFN, patch
# merging, theta shift, the block (RetBlock = PPMA's BasicBlock), the q/k/v/LePE/out projections (Retention) and
# the row / column batching of the separable attention
from .rmt import PatchEmbed, PatchMerging, RetBlock, Retention, per_column, per_row, rotary_angle, rotary_sin_cos


class RotaryPosition(nn.Module):
    """The theta-shift angles of a stage (reference: RotaryPositionEmbedding2D, RMT's RetNetRelPos2d without the
    decay buffer).  ``angle`` is saved in the reference checkpoint, so it stays a persistent buffer."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.register_buffer("angle", rotary_angle(dim // heads))

    def forward(self, grid: tuple[int, int]) -> "PathPosition":
        return PathPosition(*rotary_sin_cos(self.angle, grid))


@dataclass
class PathPosition:
    """What :class:`PolylineAttention` hands to ``attend``: the stage's rotary sin/cos and the block's decays."""

    sin: torch.Tensor
    cos: torch.Tensor
    row_decay: Optional[torch.Tensor] = None
    col_decay: Optional[torch.Tensor] = None


class PathDecays(nn.Module):
    """PPMA's selective decays (reference: PathEmbeding2D): (b, h, w, c) -> row and column decays (b, heads, h, w)."""

    def __init__(self, dim: int, heads: int, a_range=(1.0, 1.1), dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        super().__init__()
        self.heads = heads
        self.dt_linear = nn.Linear(dim // heads, 2, bias=False)
        # Mamba's initialisation: dt log-uniform in [dt_min, dt_max], dt_bias = softplus^-1(dt); A in a_range
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(*a_range).log())

    def forward(self, x):
        B, H, W, C = x.shape
        dt = self.dt_linear(x.reshape(B, H, W, self.heads, C // self.heads))  # (b, h, w, heads, 2)
        A = -torch.exp(self.A_log)
        decays = F.softplus(dt + self.dt_bias[:, None]) * A[:, None]
        row, col = decays.permute(4, 0, 3, 1, 2)  # alpha (along rows), beta (along columns): (b, heads, h, w)
        return row, col


def _attend(q, k, v, bias, name):
    """One softmax over all keys with an additive bias computed in the graph (scale 1: k is pre-scaled)."""
    everything = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
    return masked_attention(q, k, v, everything, bias, scale=1.0, mask_name=name)


def _unlines(t, batch: int):
    """Inverse of :func:`~edgeattn.models.rmt.per_row`: (b*L1, n, L2, d) -> (b, n, L1, L2, d)."""
    return t.unflatten(0, (batch, -1)).transpose(1, 2)


class PolylineAttention(Retention):
    """Reference: MambaAttentionChunkDouble (``chunk=True``) and MambaAttentionAllDouble (``chunk=False``): RMT's
    retention projections plus ``path_embed``, the selective decays."""

    def __init__(self, dim: int, heads: int, chunk: bool):
        check_heads(dim, heads, even_width=True)  # the theta shift rotates channel pairs
        super().__init__(dim, heads)
        self.chunk = chunk
        self.path_embed = PathDecays(dim, heads)

    def forward(self, x, pos: PathPosition):
        # the decays read the block's normalized input, which Retention.attend does not see: pass them along
        row_decay, col_decay = self.path_embed(x)
        return super().forward(x, PathPosition(pos.sin, pos.cos, row_decay, col_decay))

    def attend(self, q, k, v, pos: PathPosition):
        B, n, H, W, d = v.shape
        out = (self._separable if self.chunk else self._full)(q, k, v, pos.row_decay, pos.col_decay)
        return out.permute(0, 2, 3, 1, 4).reshape(B, H, W, n * d)  # (b, h, w, n*d)

    @staticmethod
    def _full(q, k, v, row_decay, col_decay):
        """0.5 softmax(QK^T + M) V + 0.5 softmax(QK^T + M^T) V over all h*w tokens."""
        B, n, H, W, d = q.shape
        q, k, v = (t.flatten(2, 3) for t in (q, k, v))
        mask = polyline_bias(row_decay, col_decay, "row")  # (b, n, hw, hw)
        out = 0.5 * _attend(q, k, v, mask, "polyline_row") + 0.5 * _attend(
            q, k, v, mask.transpose(-1, -2), "polyline_column"
        )
        return out.unflatten(2, (H, W))

    @staticmethod
    def _separable(q, k, v, row_decay, col_decay):
        """0.5 col(row(v)) + 0.5 row(col(v)): softmax along each row with its 1-D mask, along each column with its."""
        B = q.shape[0]
        rows, cols = line_biases(row_decay, col_decay)  # (b, n, h, w, w), (b, n, w, h, h)
        q_r, k_r, bias_r = per_row(q), per_row(k), per_row(rows)  # per row: (b*h, n, w, .)
        # per column: (b*w, n, h, .); cols is laid out per column already, so per_row batches its columns
        q_c, k_c, bias_c = per_column(q), per_column(k), per_row(cols)

        def along_rows(t):  # (b, n, h, w, d) -> same, each row attended with its row mask
            return _unlines(_attend(q_r, k_r, per_row(t), bias_r, "polyline_rows"), B)

        def along_cols(t):
            return _unlines(_attend(q_c, k_c, per_column(t), bias_c, "polyline_columns"), B).transpose(2, 3)

        return 0.5 * along_cols(along_rows(v)) + 0.5 * along_rows(along_cols(v))


class PPMALayer(nn.Module):
    """One stage (reference: BasicLayer): blocks sharing the theta-shift angles, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        out_dim,
        depth: int,
        heads: int,
        ffn_dim: int,
        chunk: bool,
        layerscale: bool,
        layer_init_values: float,
    ):
        super().__init__()
        self.Relpos = RotaryPosition(dim, heads)
        self.blocks = nn.ModuleList(
            RetBlock(PolylineAttention(dim, heads, chunk), dim, ffn_dim, layerscale, layer_init_values)
            for _ in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim) if out_dim else None

    def forward(self, x):
        pos = self.Relpos(tuple(x.shape[1:3]))
        for block in self.blocks:
            x = block(x, pos)
        return self.downsample(x) if self.downsample is not None else x


class PPMAViT(nn.Module):
    def __init__(
        self,
        embed_dims=(64, 128, 256, 512),
        depths=(2, 2, 8, 2),
        num_heads=(4, 4, 8, 16),
        mlp_ratios=(3, 3, 3, 3),
        chunkwise=(True, True, False, False),
        layerscales=(False,) * 4,
        layer_init_values=1e-6,
        projection=1024,
        num_classes=1000,
        in_chans=3,
    ):
        super().__init__()
        stages = len(depths)
        for label, values in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("mlp_ratios", mlp_ratios),
            ("chunkwise", chunkwise),
            ("layerscales", layerscales),
        ):
            if len(values) != stages:
                raise InvalidArgument(
                    f"{label} has {len(values)} entries for {stages} stages (depths={list(depths)}); give one per stage"
                )
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList(
            PPMALayer(
                embed_dims[i],
                embed_dims[i + 1] if i + 1 < stages else None,
                depths[i],
                num_heads[i],
                int(mlp_ratios[i] * embed_dims[i]),
                chunkwise[i],
                layerscales[i],
                layer_init_values,
            )
            for i in range(stages)
        )
        self.proj = nn.Linear(embed_dims[-1], projection)
        self.norm = nn.BatchNorm2d(projection)
        self.swish = nn.SiLU()  # the reference's MemoryEfficientSwish: x * sigmoid(x)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
        init_linear(self)  # the reference's initialisation (it overrides the attention's xavier init as well)

    def forward(self, image):
        if image.ndim != 4 or image.shape[1] != self.in_chans:
            raise InvalidArgument(
                f"PPMA takes (batch, {self.in_chans}, height, width) images, got {tuple(image.shape)}"
            )
        x = self.patch_embed(image)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(self.proj(x).permute(0, 3, 1, 2))  # (b, projection, h, w)
        return self.head(self.swish(x).mean(dim=(2, 3)))


@register(
    "ppma-t",
    "PPMA-T (polyline path masked attention ViT), 224x224 image -> 1000 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    embed_dims=[64, 128, 256, 512],
    depths=[2, 2, 8, 2],
    num_heads=[4, 4, 8, 16],
    mlp_ratios=[3, 3, 3, 3],
    chunkwise=[True, True, False, False],
    layerscales=[False] * 4,
    projection=1024,
    num_classes=1000,
)
def ppma_t(image_size, **config) -> PPMAViT:
    return PPMAViT(**config)  # any image size runs: the masks follow the feature map; image_size sets the input
