"""Swin Transformer: ``swin-t`` (Swin-T) and ``swin-tiny-block`` (one stage without relative position bias).

Reference: Liu et al., "Swin Transformer" (ICCV 2021), github.com/microsoft/Swin-Transformer,
``models/swin_transformer.py`` (WindowAttention, SwinTransformerBlock, PatchMerging, BasicLayer, PatchEmbed,
SwinTransformer) and ``configs/swin/swin_tiny_patch4_window7_224.yaml`` (embed 96, depths 2/2/6/2, heads
3/6/12/24, window 7).

- patch embedding: 4x4 stride-4 conv, LayerNorm;
- stages of pre-norm blocks x + attn(norm1(x)), x + mlp(norm2(x)); blocks alternate shift 0 and window//2, and a
  window no smaller than the map is shrunk to the map and not shifted (stage 4 at 224);
- window attention: qkv -> q * head_dim^-0.5, q k^T + relative_position_bias_table[relative_position_index],
  other regions of a shifted window masked, softmax, v, proj;
- patch merging between stages: concatenate the 2x2 neighbours (order (0,0), (1,0), (0,1), (1,1)), LayerNorm,
  linear 4C -> 2C without bias; then LayerNorm, mean over tokens, linear head.

The cyclic shift and window partition are a static mask on the unshifted grid (``masks.window``): the same
tokens attend each other, and Swin's -100 on other regions becomes a mask (a difference below exp(-100)).  The
bias is gathered from ``relative_position_bias_table`` through the mask table's index, which is Swin's
relative_position_index applied to the rolled window coordinates.  Parameter and buffer names are the reference's
state-dict keys; the derived buffers Swin saves (``relative_position_index``, the shifted blocks' ``attn_mask``)
are kept under the same names, built from our masks, so an official checkpoint loads strictly, and a checkpoint
whose derived buffers differ from ours (another window, shift or resolution) is refused with the key named.
Weight init follows the reference (truncated-normal linear weights and bias table, std 0.02; zero linear biases).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import tables
from ..errors import InvalidArgument
from ..layers import MaskedBlock, MaskedSelfAttention, init_linear
from ..masks import window
from ..masks.base import Shape, rpb_index
from .common import image_inputs, token_inputs
from .registry import register


class WindowAttention(MaskedSelfAttention):
    """Masked window attention with Swin's parameter names: ``relative_position_bias_table`` ((2Wh-1)(2Ww-1),
    heads), the derived ``relative_position_index`` (Wh*Ww, Wh*Ww) buffer, ``qkv``, ``proj``."""

    def __init__(self, dim, heads, mask, grid=None, window_size=7, **kwargs):
        super().__init__(dim, heads, mask, grid=grid, rpb=False, **kwargs)
        self.window_size = window_size
        if self.mask.rpb is not None:
            self.relative_position_bias_table = nn.Parameter(
                nn.init.trunc_normal_(torch.empty(*self.table.rpb_shape, heads), std=0.02)
            )
            # Swin's index inside one window: the same mask's index on a one-window grid (nothing rolled)
            self.register_buffer(
                "relative_position_index", rpb_index(window(window_size, rpb=True), grid=(window_size, window_size))
            )

    def relative_bias(self):
        table = getattr(self, "relative_position_bias_table", None)
        return None if table is None else table.t()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict = _check_derived(
            self, state_dict, prefix, "relative_position_index", args[-1], f"window {self.window_size}"
        )
        super()._load_from_state_dict(state_dict, prefix, *args)


class SwinBlock(MaskedBlock):
    """SwinTransformerBlock; a shifted block also keeps Swin's ``attn_mask`` buffer (nW, N, N) of 0 / -100."""

    def __init__(self, dim, heads, grid, mask, window_size, shift, mlp_ratio):
        super().__init__(
            dim,
            heads,
            mask,
            grid=grid,
            mlp_ratio=mlp_ratio,
            named_mlp=True,
            attention=functools.partial(WindowAttention, window_size=window_size),
        )
        self.register_buffer("attn_mask", _swin_attn_mask(mask, grid, window_size, shift) if shift else None)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict = _check_derived(self, state_dict, prefix, "attn_mask", args[-1], self.attn.mask.name)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _check_derived(module, state_dict, prefix, name, error_msgs, what):
    """Record a load error when the checkpoint's copy of a derived buffer differs from ours; returns the state to
    load, with our values in place of refused ones."""
    # a model built without the buffer (no shift, no rpb) has none to compare: strict loading names the extra key
    key, ours = prefix + name, getattr(module, name, None)
    theirs = state_dict.get(key)
    if theirs is None or ours is None:
        return state_dict  # strict loading reports a missing or unexpected key itself
    if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
        error_msgs.append(
            f"{key}: the checkpoint's values differ from the ones this model derives for {what}; "
            f"it was saved for another window size, shift or input resolution: build the model for it"
        )
        # keep ours: torch copies the other tensors before it raises, and a refused copy would make this buffer
        # disagree with the mask it stands for (and refuse the next, correct, checkpoint)
        return {**state_dict, key: ours}
    return state_dict


def _swin_attn_mask(mask, grid, size, shift) -> torch.Tensor:
    """Swin's attn_mask, from our mask: windows of the map rolled by -shift (row-major), tokens row-major inside
    each window; 0 where the pair may attend, -100 where Swin separates regions."""
    H, W = grid
    rolled = ((torch.arange(H)[:, None] + shift) % H) * W + (torch.arange(W)[None, :] + shift) % W  # token ids
    tokens = rolled.reshape(H // size, size, W // size, size).transpose(1, 2).reshape(-1, size * size)
    mask_mod, _ = mask.mods(Shape.of(grid=grid))
    zero = torch.zeros((), dtype=torch.long)
    allowed = mask_mod(zero, zero, tokens[:, :, None], tokens[:, None, :])
    return torch.zeros(allowed.shape).masked_fill(~allowed, -100.0)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, C): p x p stride-p conv, LayerNorm."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image):
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): concatenate each 2x2 neighbourhood, LayerNorm, linear without bias."""

    def __init__(self, grid, dim):
        super().__init__()
        self.grid = tuple(grid)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        (H, W), (B, _, C) = self.grid, x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C)
        # the reference's order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2 * W // 2, 4 * C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: blocks alternating shift 0 and window//2 on a ``grid`` of tokens, then optional patch merging.
    Swin's rule: a window no smaller than the map is shrunk to the map and not shifted."""

    def __init__(
        self, grid=(56, 56), dim=64, heads=2, window_size=7, depth=2, mlp_ratio=4.0, rpb=False, downsample=False
    ):
        super().__init__()
        grid = tuple(grid)
        shift = window_size // 2
        if min(grid) <= window_size:
            window_size, shift = min(grid), 0
        shifts = [shift if i % 2 else 0 for i in range(depth)]
        masks = {s: window(window_size, shift=s, rpb=rpb) for s in set(shifts)}
        with tables.reuse():  # blocks with the same shift share one table
            self.blocks = nn.ModuleList(
                SwinBlock(dim, heads, grid, masks[s], window_size, s, mlp_ratio) for s in shifts
            )
        self.downsample = PatchMerging(grid, dim) if downsample else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens if self.downsample is None else self.downsample(tokens)


class SwinTransformer(nn.Module):
    def __init__(
        self,
        image_size=224,
        patch_size=4,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        num_classes=1000,
    ):
        super().__init__()
        if len(depths) != len(heads):
            raise InvalidArgument(f"depths and heads need one entry per stage, got {list(depths)} and {list(heads)}")
        side = image_size // patch_size
        if image_size % patch_size or side % 2 ** (len(depths) - 1):
            raise InvalidArgument(
                f"image_size {image_size} must be a multiple of patch_size {patch_size} times "
                f"{2 ** (len(depths) - 1)} (patch merging halves the map {len(depths) - 1} times)"
            )
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.layers = nn.ModuleList(
            BasicLayer(
                (side >> i, side >> i),
                embed_dim * 2**i,
                head,
                window_size,
                depth,
                mlp_ratio,
                rpb=True,
                downsample=i + 1 < len(depths),
            )
            for i, (depth, head) in enumerate(zip(depths, heads))
        )
        features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, num_classes)
        init_linear(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


@register(
    "swin-tiny-block",
    "Swin stage: window 7 + shifted window 7 blocks on 56x56 tokens, dim 64, 2 heads",
    token_inputs,
    grid=[56, 56],
    dim=64,
    heads=2,
    window_size=7,
    depth=2,
)
def swin_tiny_block(**config) -> BasicLayer:
    return BasicLayer(**config)


@register(
    "swin-t",
    "Swin-T (microsoft swin_tiny_patch4_window7_224): depths 2/2/6/2, window 7, shifted windows, "
    "relative position bias, 224x224 image -> 1000 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    patch_size=4,
    embed_dim=96,
    depths=[2, 2, 6, 2],
    heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4.0,
    num_classes=1000,
)
def swin_t(**config) -> SwinTransformer:
    return SwinTransformer(**config)
