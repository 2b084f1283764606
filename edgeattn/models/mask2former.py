"""``mask2former-decoder``: Mask2Former's multi-scale masked-attention transformer decoder.

Reference: Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation" (CVPR 2022),
github.com/facebookresearch/Mask2Former: ``mask2former/modeling/transformer_decoder/
mask2former_transformer_decoder.py`` (MultiScaleMaskedTransformerDecoder, CrossAttentionLayer,
SelfAttentionLayer, FFNLayer, MLP) and ``position_encoding.py`` (PositionEmbeddingSine); the order of the
feature maps comes from ``mask2former/modeling/pixel_decoder/msdeformattn.py`` (``forward_features`` returns the
three coarsest maps first: strides 32, 16, 8) and the widths from the shipped configs (``configs/*/...yaml``).

What it computes, as the reference does:

- each of the 3 feature maps gets its 1x1 input projection (none when its channels already equal the hidden
  width, as in every shipped config), its learned level embedding and a normalized sine positional encoding;
- learned query features and query positional embeddings; a prediction head (decoder norm, class linear,
  3-layer mask MLP, einsum with the stride-4 mask features) runs on the queries before the first layer and
  after every layer;
- layer ``i`` attends level ``i % 3`` (round-robin): masked cross-attention, then self-attention, then an FFN,
  each followed by residual + LayerNorm (post-norm: ``PRE_NORM: False`` in every shipped config; dropout 0);
- the cross-attention mask is the previous prediction resized (bilinear, align_corners=False) to the attended
  level, ``sigmoid < 0.5`` meaning masked, the same for every head; a query whose mask excludes every position
  attends everywhere instead.

The masks depend on the inputs, so they are computed in the graph and handed to
``edgeattn.attention.masked_attention`` as (B, heads, queries, HW) bool tensors; export gives those nodes a
dense-table lowering.  Self-attention has no mask: it uses torch's scaled_dot_product_attention, which the
exporter lowers to plain MatMul/Softmax, so no all-true table is built or shipped.

Parameter names follow nn.MultiheadAttention (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) and the
reference module tree, so the decoder keys of a Mask2Former checkpoint (``sem_seg_head.predictor.*`` with that
prefix removed) load with ``strict=True``.  Tensors are batch-first here (the reference is sequence-first); the
arithmetic is the same.  Only the final ``pred_logits`` / ``pred_masks`` are returned (no auxiliary outputs).

Registered size: the reference decoder at full width (hidden 256, 8 heads, FFN 2048, 100 queries, 9 layers,
mask dim 256, 150 ADE20K classes) on a 512x512 image, the ADE20K crop size: 16x16, 32x32 and 64x64 maps and
128x128 mask features.  These are the shapes the reference runs; attention over at most 4,096 keys for 100
queries is small, so export and the parity check stay well under a minute on a 2-core CPU.

Parity: the default fp32 gate (1e-4) holds on the registered inputs (about 8e-6 on onnxruntime and OpenVINO).
The masks are a threshold, so outputs are not continuous in the inputs: an interpolated mask value within float
rounding of 0.5 can land on the other side on another runtime, and that query then attends one position more or
fewer, which moves outputs by ~4e-3 (3 of 8 random full-size inputs have one such tie).  The threshold is declared
as a hard decision (:mod:`edgeattn.decisions`), so the parity check recognises a tie, re-runs the reference with
the runtime's decision there and reports "1 of 1612800 decisions flipped ..." with the error that remains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import decisions
from ..attention import masked_attention
from ..errors import InvalidArgument
from .registry import register

NUM_LEVELS = 3  # the reference always attends 3 scales
STRIDES = (32, 16, 8)  # the order the pixel decoder hands them over; the mask features are at stride 4
MASK_STRIDE = 4


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed q/k/v ``in_proj_*``, ``out_proj``) on batch-first tensors.

    ``mask``: None for plain attention, or a bool (B, heads, Nq, Nkv) tensor, True where a query may attend."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention zeroes both biases; the reference layers then xavier-fill every matrix
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x, index):
        weight, bias = self.in_proj_weight.chunk(3)[index], self.in_proj_bias.chunk(3)[index]
        B, N, _ = x.shape
        return F.linear(x, weight, bias).reshape(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, query, key, value, mask=None):
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        if mask is None:  # self-attention: nothing to mask, so no all-true table; exports as MatMul/Softmax
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = masked_attention(q, k, v, mask)
        B, N, C = query.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttentionLayer(nn.Module):
    """Queries (+ their positional embedding) attend the level's tokens (+ theirs); residual, then LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, memory, mask, memory_pos, query_pos):
        attended = self.multihead_attn(queries + query_pos, memory + memory_pos, memory, mask)
        return self.norm(queries + attended)


class SelfAttentionLayer(nn.Module):
    """Queries attend each other; position embedding on queries and keys, not values; residual, LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, query_pos):
        with_pos = queries + query_pos
        return self.norm(queries + self.self_attn(with_pos, with_pos, queries))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x):
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last)."""

    def __init__(self, dim: int, hidden: int, out: int, depth: int):
        super().__init__()
        widths = [dim] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def sine_position_embedding(height: int, width: int, channels: int, temperature: float = 10000.0):
    """(height * width, 2 * channels): DETR's normalized sine encoding of an unpadded map, y half then x half;
    within each half sin and cos alternate, the pair k using frequency temperature ** (2k / channels)."""

    def encode(length):
        pos = torch.arange(1, length + 1, dtype=torch.float32)
        pos = pos / (pos[-1:] + 1e-6) * (2 * math.pi)  # normalized to (0, 2 pi]
        freq = temperature ** (torch.arange(0, channels, 2, dtype=torch.float32) / channels)
        angle = pos[:, None] / freq
        return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # (length, channels)

    y = encode(height)[:, None, :].expand(height, width, channels)
    x = encode(width)[None, :, :].expand(height, width, channels)
    return torch.cat((y, x), dim=-1).reshape(height * width, 2 * channels)


class Mask2FormerDecoder(nn.Module):
    """forward(features_s32, features_s16, features_s8, mask_features) -> (pred_logits, pred_masks):
    (B, queries, classes + 1) class logits (the last is "no object") and (B, queries, H/4, W/4) mask logits."""

    def __init__(
        self,
        in_channels=256,
        hidden_dim=256,
        num_queries=100,
        heads=8,
        dim_feedforward=2048,
        dec_layers=9,
        mask_dim=256,
        num_classes=150,
        enforce_input_project=False,
    ):
        super().__init__()
        if hidden_dim % 2 or heads < 1 or hidden_dim % heads:
            raise InvalidArgument(
                f"hidden_dim must be even and a multiple of heads, got hidden_dim={hidden_dim}, heads={heads}"
            )
        if dec_layers < 1 or num_queries < 1 or num_classes < 1:
            raise InvalidArgument(
                f"dec_layers, num_queries and num_classes must be >= 1, got {dec_layers}, {num_queries}, {num_classes}"
            )
        self.heads, self.in_channels, self.mask_dim = heads, in_channels, mask_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, heads) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, heads) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(
            self._projection(in_channels, hidden_dim)
            if in_channels != hidden_dim or enforce_input_project
            else nn.Identity()
            for _ in range(NUM_LEVELS)
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @staticmethod
    def _projection(in_channels, hidden_dim):
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        nn.init.kaiming_uniform_(conv.weight, a=1)  # Caffe2's xavier fill, as the reference's input_proj
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, features_s32, features_s16, features_s8, mask_features):
        levels = (features_s32, features_s16, features_s8)
        self._check(levels, mask_features)
        B, C = mask_features.shape[0], self.query_feat.weight.shape[1]
        memory, memory_pos, sizes = [], [], []
        for i, x in enumerate(levels):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            memory_pos.append(sine_position_embedding(h, w, C // 2).to(x.dtype))  # (HW, C), batch-free
            memory.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][:, None]).transpose(1, 2))
        query_pos = self.query_embed.weight.expand(B, -1, -1)
        queries = self.query_feat.weight.expand(B, -1, -1)

        # the first prediction comes from the learned queries alone and masks layer 0's cross-attention
        logits, masks = self.predict(queries, mask_features)
        layers = zip(
            self.transformer_cross_attention_layers, self.transformer_self_attention_layers, self.transformer_ffn_layers
        )
        for i, (cross, self_attn, ffn) in enumerate(layers):
            level = i % NUM_LEVELS
            allowed = self.attention_mask(masks, sizes[level])
            queries = cross(queries, memory[level], allowed, memory_pos[level], query_pos)
            queries = ffn(self_attn(queries, query_pos))
            logits, masks = self.predict(queries, mask_features)
        return logits, masks

    def predict(self, queries, mask_features):
        """Class logits (B, Q, classes + 1) and mask logits (B, Q, H/4, W/4) from the current queries."""
        decoded = self.decoder_norm(queries)
        return self.class_embed(decoded), torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)

    def attention_mask(self, mask_logits, size):
        """Mask logits (B, Q, h', w') -> bool (B, 1, Q, h*w), True where a query may attend (the same for every
        head: attention broadcasts it, so the exported graph masks B*Q*hw scores, not heads times that)."""
        resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        # the reference masks sigmoid < 0.5 (computed, not compared as logits < 0: the two differ in the last bit)
        # a declared decision: parity tells a value within rounding of 0.5 that flips on a runtime from an error
        allowed = ~decisions.below(resized.sigmoid().flatten(2), 0.5, "mask2former attention mask")
        # a query whose mask excludes every position attends everywhere instead (the reference's rule)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed[:, None]

    def _check(self, levels, mask_features):
        shapes = [tuple(x.shape) for x in (*levels, mask_features)]
        # compared, not put in a set: under a dynamic-batch export the batch sizes are unhashable symbols
        if any(len(s) != 4 for s in shapes) or any(s[0] != shapes[0][0] for s in shapes):
            raise InvalidArgument(
                f"expected 4 maps (B, C, H, W) with one batch size: 3 feature maps at strides "
                f"{STRIDES} and the mask features, got shapes {shapes}"
            )
        if any(s[1] != self.in_channels for s in shapes[:3]) or shapes[3][1] != self.mask_dim:
            raise InvalidArgument(
                f"feature maps need {self.in_channels} channels and the mask features "
                f"{self.mask_dim}, got shapes {shapes}"
            )


def _inputs(image_size, in_channels, mask_dim, **_):
    if image_size % max(STRIDES):
        raise InvalidArgument(f"image_size must be a multiple of {max(STRIDES)}, got {image_size}")
    maps = {f"features_s{s}": (1, in_channels, image_size // s, image_size // s) for s in STRIDES}
    return {**maps, "mask_features": (1, mask_dim, image_size // MASK_STRIDE, image_size // MASK_STRIDE)}


@register(
    "mask2former-decoder",
    "Mask2Former masked-attention decoder, 9 layers, 100 queries, 256 wide, "
    "512x512 image (16/32/64 px maps, 128 px mask features) -> class and mask logits",
    _inputs,
    outputs=("pred_logits", "pred_masks"),
    image_size=512,
    in_channels=256,
    hidden_dim=256,
    num_queries=100,
    heads=8,
    dim_feedforward=2048,
    dec_layers=9,
    mask_dim=256,
    num_classes=150,
    enforce_input_project=False,
)
def mask2former_decoder(image_size, **config) -> Mask2FormerDecoder:
    return Mask2FormerDecoder(**config)
