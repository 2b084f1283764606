"""transformers' vision attention -> edgeattn: Swin's windowed layers and Mask2Former's masked cross-attention.

Swin (``SwinLayer``, also inside ``SwinBackbone`` and so inside Mask2Former): transformers pads the normalized map
with zero tokens to a window multiple, rolls it by ``-shift`` on odd layers, cuts windows, adds the relative position
bias and a -100 region mask, and reverses all that.  The converted layer pads the same way (the zero tokens are keys
and values of real tokens in transformers: leaving them out would change the numbers) and runs one masked attention
over the whole padded grid with ``masks.window(window, shift, rpb=True)``: the same token pairs, the same bias index,
so no roll or partition.  -100 becomes a true mask: a query always sees its own region, so the other regions weigh
below exp(-100) of it, under float32 rounding.  transformers resets the shift to 0 (and the window to the map) on a
map no larger than the window; the layer's window and shift are read after one run on the example inputs, which also
records each layer's grid.  A map smaller than the window is refused: transformers keeps the bias of the full
window there and fails itself.  A bare ``SwinLayer`` converts too (:func:`edgeattn.convert` gives it a parent, see
:func:`is_layer`), with example inputs ``(hidden_states, (height, width))`` as transformers calls it.

Mask2Former (``Mask2FormerMaskedAttentionDecoder``'s mask predictor, each decoder layer's ``cross_attn``): the
predictor's ``sigmoid(mask logits) < 0.5`` is declared a hard decision (:mod:`edgeattn.decisions`) so parity can
explain ties, and the cross-attention runs on :func:`edgeattn.masked_attention` with that graph-computed mask (the
decoder itself lets a query masked everywhere attend everywhere).

Weights stay the module's own Parameters under their names (the state dict is unchanged); the table buffers are
derived and not saved.  Converted Swin layers refuse ``output_attentions``; the cross-attention returns no weights
(Mask2Former's decoder does not use them).  transformers is never imported here: a module holds its classes only if
transformers' modeling file is already loaded.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .. import decisions, tables
from ..attention import masked_attention
from ..errors import ExportFailed, InvalidArgument
from ..layers import MaskTable
from ..masks import window

SWIN = "transformers.models.swin.modeling_swin"
MASK2FORMER = "transformers.models.mask2former.modeling_mask2former"


def convert(module: nn.Module, example_inputs: tuple, layout: str) -> list[str]:
    lines = []
    if SWIN in sys.modules:  # not loaded: no SwinLayer can exist, and no need to import transformers
        lines += _convert_swin(module, example_inputs, layout, sys.modules[SWIN].SwinLayer)
    if MASK2FORMER in sys.modules:
        lines += _convert_mask2former(module, sys.modules[MASK2FORMER])
    return lines


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is itself a transformers ``SwinLayer``, which :func:`convert` replaces in its parent."""
    return SWIN in sys.modules and isinstance(module, sys.modules[SWIN].SwinLayer)


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    holder = module.get_submodule(parent) if parent else module
    new.train(getattr(holder, child).training)  # a new module starts in training mode: take the original's
    setattr(holder, child, new)


def _training_error(what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{what} has attention dropout, which the converted layer does not apply: call .eval() "
        f"before running or exporting the converted model"
    )


# ---- Swin ----------------------------------------------------------------------------------------------------


def _convert_swin(module, example_inputs, layout, layer_type) -> list[str]:
    layers = {name: m for name, m in module.named_modules() if isinstance(m, layer_type)}
    if not layers:
        return []
    if not example_inputs:
        raise InvalidArgument(
            f"{type(module).__name__} has transformers Swin layers, whose grid comes from the input: "
            f"call convert(model, pixel_values) with an example input of the size you will export"
        )
    grids = _record_grids(module, example_inputs, layers)
    lines, masks = [], {}
    with tables.reuse():  # layers of one stage with the same shift share one table
        for name, layer in layers.items():
            if name not in grids:  # never called on these inputs: left as it is, and not reported
                continue
            size, shift = int(layer.window_size), int(layer.shift_size)
            if shift not in masks.setdefault(size, {}):
                masks[size][shift] = window(size, shift=shift, rpb=True)
            new = SwinGridLayer(layer, grids[name], size, shift, masks[size][shift], layout)
            _replace(module, name, new)
            pad = "" if new.padded == new.grid else f", padded to {new.padded[0]}x{new.padded[1]}"
            lines.append(
                f"{name}: transformers SwinLayer -> masked attention {new.attention.table.mask.name} on "
                f"{new.grid[0]}x{new.grid[1]} tokens{pad}, {new.attention.table.layout} table"
            )
    return lines


def _record_grids(module, example_inputs, layers) -> dict[str, tuple[int, int]]:
    """Each Swin layer's (height, width) on one run of ``module`` on the example inputs; refuses a grid that
    transformers cannot run before transformers fails on it."""
    grids: dict[str, tuple[int, int]] = {}

    def record(name, layer, args, kwargs):
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        dims = (int(dims[0]), int(dims[1]))
        always = args[2] if len(args) > 2 else kwargs.get("always_partition", False)
        if not always and min(dims) < layer.window_size:
            table = layer.attention.relative_position_bias.window_size
            raise ExportFailed(
                f"{name} sees a {dims[0]}x{dims[1]} map, smaller than its window {layer.window_size}: transformers "
                f"shrinks the window to the map but keeps the relative position bias of a {table[0]}x{table[1]} "
                f"window, so the model itself fails at this size; use an input whose smallest stage is at least "
                f"the window"
            )
        if grids.setdefault(name, dims) != dims:
            raise ExportFailed(
                f"{name} ran on {grids[name]} and {dims} grids in one call: a converted layer has one static grid"
            )

    handles = [
        layer.register_forward_pre_hook(lambda m, a, k, n=name: record(n, m, a, k), with_kwargs=True)
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return grids


class SwinGridLayer(nn.Module):
    """A transformers ``SwinLayer`` (same submodules and state-dict keys) whose attention is one masked attention
    over its whole zero-padded grid; called as SwinLayer is, returns ``(hidden_states, None)``."""

    def __init__(self, layer: nn.Module, grid, size: int, shift: int, mask, layout: str):
        super().__init__()
        self.grid = tuple(grid)
        # transformers pads the bottom and right to a window multiple, rolls and cuts windows there
        self.padded = tuple(math.ceil(n / size) * size for n in self.grid)
        self.window_size, self.shift_size = size, shift
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after
        self.attention = SwinGridAttention(layer.attention, mask, self.padded, layout)
        self.dropout, self.drop_path, self.mlp = layer.dropout, layer.drop_path, layer.mlp

    def forward(self, hidden_states: torch.Tensor, input_dimensions, always_partition: bool = False, **kwargs):
        if tuple(input_dimensions) != self.grid:
            raise InvalidArgument(
                f"this Swin layer was converted for a {self.grid[0]}x{self.grid[1]} grid, got "
                f"{tuple(input_dimensions)}: its mask table is static, convert the model with an "
                f"input of this size"
            )
        if kwargs.get("output_attentions"):
            raise InvalidArgument(
                "a converted Swin layer has no per-window attention weights to return: ask the "
                "original transformers model for output_attentions"
            )
        (H, W), (Hp, Wp) = self.grid, self.padded
        B, _, C = hidden_states.shape
        x = self.layernorm_before(hidden_states)
        if (Hp, Wp) != (H, W):  # zeros after the norm, as transformers pads: they are keys and values
            x = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        x = self.attention(x.reshape(B, Hp * Wp, C))
        if (Hp, Wp) != (H, W):
            x = x.view(B, Hp, Wp, C)[:, :H, :W]
        hidden_states = hidden_states + self.drop_path(self.dropout(x.reshape(B, H * W, C)))
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states, None

    def extra_repr(self) -> str:
        return f"grid={self.grid}, padded={self.padded}, window={self.window_size}, shift={self.shift_size}"


class SwinGridAttention(nn.Module):
    """SwinAttention's projections and relative position bias table on a :class:`MaskTable` over the grid."""

    def __init__(self, attention: nn.Module, mask, grid, layout: str):
        super().__init__()
        self.heads, self.head_dim = attention.num_attention_heads, attention.head_dim
        self.scaling, self.attention_dropout = attention.scaling, attention.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        # kept whole: its table stays the trainable Parameter under its key, gathered through our index
        self.relative_position_bias = attention.relative_position_bias
        self.table = MaskTable(mask, self.heads, grid=grid, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attention_dropout > 0:
            raise _training_error("this Swin layer")
        B, N, C = x.shape
        q, k, v = (
            proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        bias = self.relative_position_bias.relative_position_bias_table  # ((2w-1)^2, heads)
        out = self.table(q, k, v, scale=self.scaling, rpb=bias.t())
        return self.o_proj(out.transpose(1, 2).reshape(B, N, C))


# ---- Mask2Former ---------------------------------------------------------------------------------------------


def _convert_mask2former(module, modeling) -> list[str]:
    lines = []
    for name, m in list(module.named_modules()):
        if isinstance(m, modeling.Mask2FormerMaskedAttentionDecoder):
            m.mask_predictor = DecidedMaskPredictor(m.mask_predictor).train(m.training)
            # the decoder's last prediction makes a mask no layer uses: export drops it, so it must not be declared
            # (parity matches the file's decisions to the model's in order)
            calls = len(m.layers) + 1
            m.register_forward_pre_hook(lambda decoder, args, n=calls: setattr(decoder.mask_predictor, "left", n))
            lines.append(
                f"{name}.mask_predictor: Mask2Former mask predictor -> attention mask sigmoid < 0.5 as a "
                f"declared decision"
            )
        elif isinstance(m, modeling.Mask2FormerMaskedAttentionDecoderLayer):
            m.cross_attn = MaskedCrossAttention(m.cross_attn, f"{name}.cross_attn").train(m.training)
            lines.append(
                f"{name}.cross_attn: nn.MultiheadAttention -> edgeattn.masked_attention with the predicted mask"
            )
    return lines


class DecidedMaskPredictor(nn.Module):
    """Mask2FormerMaskPredictor with its threshold declared: the same mask logits and (B * heads, Q, h * w) bool
    attention mask, True where a query may not attend."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.hidden_size, self.num_heads = predictor.hidden_size, predictor.num_heads
        self.mask_embedder = predictor.mask_embedder
        self.left = 0  # predictions left in the decoder's current call (set by it); 1: its unused last one

    def forward(self, outputs: torch.Tensor, pixel_embeddings: torch.Tensor, attention_mask_target_size=None):
        embeddings = self.mask_embedder(outputs.transpose(0, 1))  # queries come sequence-first
        mask_logits = torch.einsum("bqc,bchw->bqhw", embeddings, pixel_embeddings)
        resized = F.interpolate(mask_logits, size=attention_mask_target_size, mode="bilinear", align_corners=False)
        # sigmoid then compare, as transformers does (logits < 0 differs in the last bit); decided once per query
        # and position, then repeated per head as transformers lays the mask out
        probability = resized.sigmoid().flatten(2)
        self.left -= 1
        masked = (
            probability < 0.5 if self.left == 0 else decisions.below(probability, 0.5, "mask2former attention mask")
        )
        return mask_logits, masked.repeat_interleave(self.num_heads, dim=0).detach()


class MaskedCrossAttention(nn.Module):
    """nn.MultiheadAttention's parameters and call (bool ``attn_mask``, True = not allowed, (B * heads, Q, S) or
    (Q, S)) on :func:`edgeattn.masked_attention`; returns ``(output, None)``."""

    def __init__(self, mha: nn.MultiheadAttention, name: str):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.in_proj_bias is None:
            raise ExportFailed(
                f"{name}: convert takes an nn.MultiheadAttention with packed q/k/v projections and "
                f"biases, no bias_k/bias_v and no add_zero_attn (transformers' Mask2Former layout)"
            )
        self.name, self.heads, self.batch_first, self.dropout = name, mha.num_heads, mha.batch_first, mha.dropout
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if key_padding_mask is not None or is_causal:
            raise InvalidArgument(
                f"{self.name}: the converted cross-attention takes attn_mask only, not key_padding_mask or is_causal"
            )
        if self.training and self.dropout > 0:
            raise _training_error(self.name)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (B, Q, C), S = query.shape, key.shape[1]
        q, k, v = (
            F.linear(t, w, b).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
            for t, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3))
        )
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif attn_mask.dtype != torch.bool or attn_mask.shape[-2:] != (Q, S):
            raise InvalidArgument(
                f"{self.name}: the converted cross-attention takes a bool attn_mask of shape (B * "
                f"heads, {Q}, {S}) or ({Q}, {S}), got {attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        else:
            allowed = ~(attn_mask.view(B, self.heads, Q, S) if attn_mask.dim() == 3 else attn_mask)
            out = masked_attention(q, k, v, allowed, mask_name="mask2former_predicted")
        out = self.out_proj(out.transpose(1, 2).reshape(B, Q, C))
        return (out if self.batch_first else out.transpose(0, 1)), None
