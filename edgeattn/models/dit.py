"""Diffusion-transformer blocks with static sparse masks: ``radial-block`` (video) and ``clear-block`` (image + text).

The block is DiT's (Peebles & Xie, "Scalable Diffusion Models with Transformers", github.com/facebookresearch/DiT,
``models.py``: DiTBlock, modulate): a conditioning vector ``c`` drives adaLN-Zero, i.e. ``SiLU -> Linear`` gives
shift/scale/gate for the attention and the MLP; layer norms have no affine parameters (eps 1e-6); attention is
timm's (qkv with bias, output projection); the MLP uses tanh-approximated GELU:

    x = x + gate_msa * attn(norm1(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * mlp(norm2(x) * (1 + scale_mlp) + shift_mlp)

DiT zero-initialises the modulation (so a fresh block is the identity map); these reference blocks keep PyTorch's
default initialisation instead, so a parity check exercises every path rather than comparing an identity.

- ``radial-block``: the attention is Radial Attention's mask (github.com/mit-han-lab/radial-attention,
  ``radial_attn/attn_mask.py``; see :mod:`edgeattn.masks.radial`) with Wan's settings (attention sink on
  frame 0, block size 64 as in ``radial_attn/models/wan2_2/attention.py``).  32 frames of 8x16 tokens (4096
  tokens, e.g. a 128x256 video after an 8x VAE and 2x2 patches): at 16 frames of 16x16 the mask still keeps
  57% of the pairs and its block table would score 73% of them (auto takes a dense table), at 32 frames it
  keeps 31% and the block table scores 34%; 4096 tokens export and check on both CPU runtimes in about
  half a minute on 2 cores.
- ``clear-block``: CLEAR's circular local window (github.com/Huage001/CLEAR, ``attention_processor.py``; see
  :mod:`edgeattn.masks.clear`) over a 32x32 image with 64 text tokens in front, radius 8.  Text rows attend
  every key, so a single table over the whole sequence would need every key in every tile: the text queries
  run plain (unmasked) attention and the image queries run against all keys through the CLEAR table, which
  is blocked (36% of the image rows' dense scores).  Both halves share the projections, so this is exactly one
  attention over the joint sequence.  FLUX itself uses MM-DiT blocks (separate text/image weights) and RoPE;
  this block keeps DiT's single set of weights and no positional encoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgument
from ..layers import MaskedSelfAttention, MaskTable, check_heads, split_qkv
from ..masks import clear, radial
from .registry import register


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """DiT's adaLN-Zero block around any (B, N, dim) -> (B, N, dim) attention module."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim != 2 or c.shape[0] != x.shape[0] or c.shape[1] != x.shape[2]:
            raise InvalidArgument(
                f"conditioning c must be (batch, dim) = ({x.shape[0]}, {x.shape[2]}), got {tuple(c.shape)}"
            )
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class RadialDiTBlock(nn.Module):
    """(B, frames*h*w, dim) video tokens (frame-major) and (B, dim) conditioning -> tokens."""

    def __init__(
        self, frames=32, frame_grid=(8, 16), dim=64, heads=2, block_size=64, decay_factor=1.0, sink=True, mlp_ratio=4.0
    ):
        super().__init__()
        mask = radial(frames, block_size=block_size, decay_factor=decay_factor, sink=sink)
        attn = MaskedSelfAttention(dim, heads, mask, seq_len=frames * math.prod(frame_grid))
        self.block = DiTBlock(dim, attn, mlp_ratio)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.block(tokens, c)


class TextImageAttention(nn.Module):
    """timm-style attention over [text, image] tokens: text queries attend every token (no mask needed), image
    queries attend through a static table of ``mask`` compiled for (image queries) x (all keys)."""

    def __init__(self, dim: int, heads: int, mask, text: int, image_tokens: int):
        super().__init__()
        self.heads, self.head_dim, self.text = heads, check_heads(dim, heads), text
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = MaskTable(mask, heads, q_len=image_tokens, kv_len=text + image_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if N != self.table.shape.kv_len:
            raise InvalidArgument(
                f"{type(self).__name__} was built for {self.table.shape.kv_len} tokens "
                f"({self.text} text + image), got {N}: the mask table is static"
            )
        q, k, v = split_qkv(self.qkv(x), self.heads, self.head_dim)
        out = self.table(q[:, :, self.text :], k, v)
        if self.text:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, : self.text], k, v), out], 2)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class ClearDiTBlock(nn.Module):
    """(B, text, dim) text tokens, (B, H*W, dim) image tokens, (B, dim) conditioning -> (text, image) tokens."""

    def __init__(self, text=64, image=(32, 32), radius=8, dim=64, heads=2, mlp_ratio=4.0):
        super().__init__()
        self.text, self.image = text, tuple(image)
        mask = clear(radius, text=text, image=self.image)
        attn = TextImageAttention(dim, heads, mask, text, math.prod(self.image))
        self.block = DiTBlock(dim, attn, mlp_ratio)

    def forward(self, text: torch.Tensor, image: torch.Tensor, c: torch.Tensor):
        if text.shape[1] != self.text or image.shape[1] != math.prod(self.image):
            raise InvalidArgument(
                f"clear-block takes {self.text} text tokens and {math.prod(self.image)} image tokens "
                f"({self.image[0]}x{self.image[1]}), got {text.shape[1]} and {image.shape[1]}"
            )
        x = self.block(torch.cat([text, image], 1), c)  # FLUX order: text first
        return x[:, : self.text], x[:, self.text :]


def _radial_inputs(frames, frame_grid, dim, **_):
    return {"tokens": (1, frames * math.prod(frame_grid), dim), "c": (1, dim)}


def _clear_inputs(text, image, dim, **_):
    return {"text": (1, text, dim), "image": (1, math.prod(image), dim), "c": (1, dim)}


@register(
    "radial-block",
    "DiT block, radial attention (Wan: sink, block 64), 32 frames x 8x16 tokens, dim 64, 2 heads",
    _radial_inputs,
    frames=32,
    frame_grid=[8, 16],
    dim=64,
    heads=2,
    block_size=64,
    decay_factor=1.0,
    sink=True,
    mlp_ratio=4.0,
)
def radial_block(**config) -> RadialDiTBlock:
    return RadialDiTBlock(**config)


@register(
    "clear-block",
    "DiT block, CLEAR radius-8 circular window on 32x32 image tokens + 64 dense text tokens, dim 64, 2 heads",
    _clear_inputs,
    outputs=("text_out", "image_out"),
    text=64,
    image=[32, 32],
    radius=8,
    dim=64,
    heads=2,
    mlp_ratio=4.0,
)
def clear_block(**config) -> ClearDiTBlock:
    return ClearDiTBlock(**config)
