"""``rmt-t``: RMT-T, the Retentive Networks Meet Vision Transformers classifier, on 224x224 images.

Reference: Fan et al., "RMT: Retentive Networks Meet Vision Transformers" (CVPR 2024), github.com/qhfan/RMT,
``classfication_release/RMT.py`` (VisRetNet, RMT_T3; RetNetRelPos2d, VisionRetentionAll/Chunk, RetBlock,
FeedForwardNetwork, PatchEmbed, PatchMerging, BasicLayer).  Written from reading that code, not copied.

Architecture (RMT_T3): a conv stem (3x3 convs, strides 2/1/2/1, BatchNorm, GELU) to 56x56 tokens, four stages of
dims 64/128/256/512, depths 2/2/8/2, heads 4/4/8/16, FFN ratio 3, no layer scale, joined by 3x3 stride-2 conv +
BatchNorm patch merging; then Linear(512 -> 1024), BatchNorm, swish, average pooling and the 1000-class head.
A block is ``x += dwconv3x3(x)``, ``x += retention(LN(x))``, ``x += ffn(LN(x))``; the FFN is fc1, GELU, a
residual 3x3 depthwise conv, fc2.  Retention: q, k, v projections; k scaled by head_dim**-0.5; q and k rotated
by the "theta shift" (rotary pairs, position = flat token index); softmax(q k^T + decay) v; plus LePE (a 5x5
depthwise conv on v) before the output projection.

The decay of head h is ``log(gamma_h) * distance`` with ``gamma_h = 1 - 2^-(init_value + heads_range * h /
heads)`` (init_value 2, heads_range 4/4/6/6).  Stages 3-4 run full attention with the Manhattan distance
(``masks.manhattan_decay``).  Stages 1-2 run the reference's separable ("chunkwise") attention: first along each
row with the 1-D decay ``|dx|``, then along each column with ``|dy|`` applied to the row outputs, with the same
rotated q and k (``masks.decay_1d``).  Both are static all-allowed masks with per-head bias tables.

Parameter and buffer names follow the reference's state dict (``layers.0.blocks.0.retention.q_proj.weight``,
``layers.0.Relpos.decay``, ``patch_embed.proj.0.weight``, ``proj``, ``norm``, ``head``...), so the official
checkpoint loads with ``strict=True``.  Inference only: drop path and dropout (identity in eval) are left out.
The building blocks are importable on their own (PPMA is built on the same code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import tables
from ..errors import InvalidArgument
from ..layers import MaskTable, check_heads
from ..masks import decay_1d, manhattan_decay
from .common import image_inputs
from .registry import register


# ----------------------------------------------------------------------------- positional pieces
def retention_decay(heads: int, initial_value: float, heads_range: float) -> torch.Tensor:
    """Per-head log(gamma_h), float32, computed the reference's way: log(1 - 2^-(init + range * h / heads))."""
    exponent = initial_value + heads_range * torch.arange(heads, dtype=torch.float32) / heads
    return torch.log(1 - torch.pow(2.0, -exponent))


def rotary_angle(key_dim: int) -> torch.Tensor:
    """(key_dim,) rotary frequencies 10000^-linspace(0, 1, key_dim/2), each repeated for its channel pair."""
    return (1.0 / 10000 ** torch.linspace(0, 1, key_dim // 2)).repeat_interleave(2)


def rotary_sin_cos(angle: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, key_dim) sin and cos of ``position * angle``; a token's position is its row-major flat index."""
    phase = torch.arange(grid[0] * grid[1]).to(angle)[:, None] * angle[None, :]
    return phase.sin().reshape(*grid, -1), phase.cos().reshape(*grid, -1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Channel pairs (a, b) -> (-b, a): multiplication by i of each complex pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., H, W, key_dim) by their token's phase (RoPE on the flat index)."""
    return x * cos + rotate_every_two(x) * sin


class RetentionRelPos2d(nn.Module):
    """Per stage: the reference's ``angle`` and ``decay`` buffers (kept in the state dict, as in the checkpoint),
    the rotary sin/cos for the stage's grid, and the decay tables as :class:`MaskTable` s: ``table`` (Manhattan
    decay on the grid) for full attention, or ``table_w`` / ``table_h`` (1-D decays along a row / a column) for
    the separable attention.  Tables and sin/cos are derived for one grid and are not saved; they are derived
    again from the loaded ``angle`` and ``decay`` whenever a state dict is loaded."""

    def __init__(self, embed_dim: int, heads: int, initial_value: float, heads_range: float, grid, chunkwise: bool):
        super().__init__()
        self.grid, self.chunkwise, self.heads = tuple(grid), chunkwise, heads
        self.register_buffer("angle", rotary_angle(embed_dim // heads))
        self.register_buffer("decay", retention_decay(heads, initial_value, heads_range))
        self.derive()

    def derive(self) -> None:
        """(Re)build sin/cos and the decay tables from ``angle`` and ``decay``, on their device and dtype."""
        sin, cos = rotary_sin_cos(self.angle, self.grid)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        # exp of the float32 log-decays: the mask takes their log back exactly, so tables match the reference's
        gammas = [math.exp(d) for d in self.decay.tolist()]
        if self.chunkwise:
            line = decay_1d(gammas)
            with tables.reuse():  # a square map's rows and columns share one table
                self.table_w = MaskTable(line, self.heads, q_len=self.grid[1]).to(self.decay)
                self.table_h = MaskTable(line, self.heads, q_len=self.grid[0]).to(self.decay)
        else:
            self.table = MaskTable(manhattan_decay(gammas), self.heads, grid=self.grid).to(self.decay)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The reference computes its rotation and decay from these buffers on every call, so a checkpoint whose
        # values differ from the formula's must change the outputs here too: derive again from what was loaded.
        try:
            self.derive()
        except ValueError as error:  # e.g. a positive decay: gamma > 1 is no decay rate
            error_msgs.append(f"{prefix}decay: cannot build the decay tables from the checkpoint's values: {error}")

    def extra_repr(self) -> str:
        return f"grid={self.grid}, chunkwise={self.chunkwise}"


# ----------------------------------------------------------------------------- convolutions and FFN
class DWConv2d(nn.Module):
    """Depthwise conv on channels-last maps: (B, H, W, C) -> (B, H', W', C)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FeedForwardNetwork(nn.Module):
    """fc1, GELU, a residual 3x3 depthwise conv, fc2 on (B, H, W, C)."""

    def __init__(self, embed_dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dwconv = DWConv2d(ffn_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class PatchEmbed(nn.Module):
    """Conv stem, (B, 3, H, W) -> (B, H/4, W/4, C): 3x3 convs with strides 2, 1, 2, 1, each followed by
    BatchNorm, GELU between them; the first two have C/2 channels."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, embed_dim, 3, 2, 1),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.Conv2d(embed_dim, embed_dim, 3, 1, 1),
            nn.BatchNorm2d(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """Downsampling between stages: 3x3 stride-2 conv then BatchNorm; (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- retention
class Retention(nn.Module):
    """Shared projections of both retention forms: q/k/v/out projections and LePE (5x5 depthwise conv on v).

    Subclasses implement ``attend(q, k, v, rel_pos)`` on rotated, head-first (B, heads, H, W, head_dim) tensors
    and return (B, H, W, heads * head_dim)."""

    def __init__(self, embed_dim: int, heads: int):
        super().__init__()
        self.heads, self.key_dim = heads, check_heads(embed_dim, heads, "embed_dim")
        self.scaling = self.key_dim**-0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.lepe = DWConv2d(embed_dim, 5, 1, 2)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, rel_pos: RetentionRelPos2d) -> torch.Tensor:
        v = self.v_proj(x)
        lepe = self.lepe(v)
        # the reference scales k (not the scores): the op then runs with scale 1
        q = theta_shift(self._heads_first(self.q_proj(x)), rel_pos.sin, rel_pos.cos)
        k = theta_shift(self._heads_first(self.k_proj(x) * self.scaling), rel_pos.sin, rel_pos.cos)
        return self.out_proj(self.attend(q, k, self._heads_first(v), rel_pos) + lepe)

    def _heads_first(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        return x.view(B, H, W, self.heads, -1).permute(0, 3, 1, 2, 4)  # (B, heads, H, W, d)

    def attend(self, q, k, v, rel_pos):
        raise NotImplementedError(
            f"{type(self).__name__} is a base class: use VisionRetentionAll (full) or "
            f"VisionRetentionChunk (separable), or override attend()"
        )


class VisionRetentionAll(Retention):
    """Full attention over all H*W tokens with the Manhattan decay (``rel_pos.table``)."""

    def attend(self, q, k, v, rel_pos):
        B, n, H, W, d = v.shape
        out = rel_pos.table(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale=1.0)  # (B, n, H*W, d)
        return out.transpose(1, 2).reshape(B, H, W, n * d)


class VisionRetentionChunk(Retention):
    """Separable attention: along each row (1-D decay |dx|), then along each column (|dy|) on the row outputs."""

    def attend(self, q, k, v, rel_pos):
        B, n, H, W, d = v.shape
        # rows: each of the B*H rows is one batch element of a W-long attention with the |dx| decay
        v = rel_pos.table_w(per_row(q), per_row(k), per_row(v), scale=1.0).unflatten(0, (B, H))  # (B, H, n, W, d)
        # then columns, on the row outputs: B*W batch elements of an H-long attention with the |dy| decay
        v = v.permute(0, 3, 2, 1, 4).flatten(0, 1)  # (B*W, n, H, d)
        out = rel_pos.table_h(per_column(q), per_column(k), v, scale=1.0).unflatten(0, (B, W))  # (B, W, n, H, d)
        return out.permute(0, 3, 1, 2, 4).flatten(-2)  # (B, H, W, n*d)


def per_row(t: torch.Tensor) -> torch.Tensor:
    """(B, n, H, W, d) -> (B*H, n, W, d): one batch element per row (PPMA's separable attention uses it too)."""
    return t.transpose(1, 2).flatten(0, 1)


def per_column(t: torch.Tensor) -> torch.Tensor:
    """(B, n, H, W, d) -> (B*W, n, H, d): one batch element per column."""
    return t.permute(0, 3, 1, 2, 4).flatten(0, 1)


# ----------------------------------------------------------------------------- blocks, stages, model
class RetBlock(nn.Module):
    """``x += pos(x)``, ``x += [gamma_1 *] retention(LN(x))``, ``x += [gamma_2 *] ffn(LN(x))`` on (B, H, W, C).

    ``retention`` is any module called as ``retention(x, rel_pos)`` (PPMA plugs its own in)."""

    def __init__(
        self,
        retention: nn.Module,
        embed_dim: int,
        ffn_dim: int,
        layerscale: bool = False,
        layer_init_values: float = 1e-5,
    ):
        super().__init__()
        self.layerscale = layerscale
        self.retention_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.retention = retention
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ffn = FeedForwardNetwork(embed_dim, ffn_dim)
        self.pos = DWConv2d(embed_dim, 3, 1, 1)
        if layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, embed_dim), float(layer_init_values)))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, embed_dim), float(layer_init_values)))

    def forward(self, x: torch.Tensor, rel_pos) -> torch.Tensor:
        x = x + self.pos(x)
        attn = self.retention(self.retention_layer_norm(x), rel_pos)
        x = x + (self.gamma_1 * attn if self.layerscale else attn)
        ffn = self.ffn(self.final_layer_norm(x))
        return x + (self.gamma_2 * ffn if self.layerscale else ffn)


class BasicLayer(nn.Module):
    """One stage on a fixed (H, W) grid: ``Relpos`` (decay tables, rotary), ``depth`` RetBlocks, then an
    optional PatchMerging ``downsample`` to ``out_dim``."""

    def __init__(
        self,
        embed_dim: int,
        out_dim,
        depth: int,
        heads: int,
        init_value: float,
        heads_range: float,
        ffn_dim: int,
        grid,
        chunkwise: bool,
        layerscale: bool = False,
        layer_init_values: float = 1e-5,
    ):
        super().__init__()
        self.Relpos = RetentionRelPos2d(embed_dim, heads, init_value, heads_range, grid, chunkwise)
        retention = VisionRetentionChunk if chunkwise else VisionRetentionAll
        self.blocks = nn.ModuleList(
            RetBlock(retention(embed_dim, heads), embed_dim, ffn_dim, layerscale, layer_init_values)
            for _ in range(depth)
        )
        self.downsample = PatchMerging(embed_dim, out_dim) if out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:3]) != self.Relpos.grid:
            raise InvalidArgument(
                f"this RMT stage was built for a {self.Relpos.grid} token grid, got "
                f"{tuple(x.shape[1:3])}: its decay tables are static, build the model for this size"
            )
        for block in self.blocks:
            x = block(x, self.Relpos)
        return x if self.downsample is None else self.downsample(x)


class VisRetNet(nn.Module):
    """The RMT classifier for ``image_size`` x ``image_size`` images; (B, 3, S, S) -> (B, num_classes) logits."""

    def __init__(
        self,
        image_size=224,
        in_chans=3,
        num_classes=1000,
        embed_dims=(64, 128, 256, 512),
        depths=(2, 2, 8, 2),
        heads=(4, 4, 8, 16),
        init_values=(2, 2, 2, 2),
        heads_ranges=(4, 4, 6, 6),
        mlp_ratios=(3, 3, 3, 3),
        chunkwise=(True, True, False, False),
        layerscales=(False, False, False, False),
        layer_init_values=1e-6,
        projection=1024,
    ):
        super().__init__()
        stages = len(depths)
        for name, values in (
            ("embed_dims", embed_dims),
            ("heads", heads),
            ("init_values", init_values),
            ("heads_ranges", heads_ranges),
            ("mlp_ratios", mlp_ratios),
            ("chunkwise", chunkwise),
            ("layerscales", layerscales),
        ):
            if len(values) != stages:
                raise InvalidArgument(f"{name} needs one entry per stage ({stages}, from depths), got {list(values)}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise InvalidArgument(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size, self.in_chans = image_size, in_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        side = -(-image_size // 4)  # two stride-2, padding-1, 3x3 convs: ceil(ceil(S / 2) / 2)
        self.layers = nn.ModuleList()
        for i in range(stages):
            self.layers.append(
                BasicLayer(
                    embed_dims[i],
                    embed_dims[i + 1] if i + 1 < stages else None,
                    depths[i],
                    heads[i],
                    init_values[i],
                    heads_ranges[i],
                    int(mlp_ratios[i] * embed_dims[i]),
                    (side, side),
                    chunkwise[i],
                    layerscales[i],
                    layer_init_values,
                )
            )
            side = (side + 1) // 2
        self.proj = nn.Linear(embed_dims[-1], projection)
        self.norm = nn.BatchNorm2d(projection)
        self.swish = nn.SiLU()  # x * sigmoid(x), the reference's MemoryEfficientSwish
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.image_size, self.image_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise InvalidArgument(
                f"RMT was built for (batch, {', '.join(map(str, expected))}) images, got "
                f"{tuple(image.shape)}; build it with image_size= for other sizes"
            )
        x = self.patch_embed(image)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(self.proj(x).permute(0, 3, 1, 2))  # BatchNorm over the projected channels
        return self.head(self.swish(x).mean(dim=(2, 3)))


@register(
    "rmt-t",
    "RMT-T: 4 stages 64/128/256/512, separable decay attention at 56x56/28x28, Manhattan decay at "
    "14x14/7x7, 224x224 image -> 1000 logits",
    image_inputs,
    outputs=("logits",),
    image_size=224,
    embed_dims=[64, 128, 256, 512],
    depths=[2, 2, 8, 2],
    heads=[4, 4, 8, 16],
    init_values=[2, 2, 2, 2],
    heads_ranges=[4, 4, 6, 6],
    mlp_ratios=[3, 3, 3, 3],
    chunkwise=[True, True, False, False],
    layerscales=[False, False, False, False],
    num_classes=1000,
)
def rmt_t(**config) -> VisRetNet:
    return VisRetNet(**config)
