"""One fixed-shape step of a transformers causal LM: C new tokens per row at per-row positions, over a cache sized by
each layer's own attention.  Exported twice by :func:`edgeattn.export.export_lm`: C = the chunk (prefill) and C = 1
(decode).

Caches (:func:`cache_plan`): a sliding layer of window W keeps a ring of W slots, the key of position p at slot
``p mod W`` (it holds the last W positions, all a query may see); with S attention sinks (StreamingLLM) it keeps
S + W slots, the first S positions in the first S slots and the ring after them; a global layer keeps
``max_cache_len`` slots, the key of position p at slot p.  The step never writes the cache: it returns only the
chunk's new keys and values, and the host writes them (:mod:`edgeattn.lmloop`), so nothing the size of the cache
leaves the graph per token.

Masks: a query at position q = p + i (p the row's position, i < C) sees the cache slots whose position k is valid
(written: k < p) and within its window (q - k < W), computed in the graph from p, and the chunk's own keys j <= i
within the window, a constant (C, C) table (dense: at chunk sizes a blocked table has nothing to skip); sinks are
seen from everywhere.  A row's padding (a last chunk shorter than C) comes after its tokens, so causality keeps it
out of every real query, and the host writes only real tokens' keys.  Attention (:func:`cached_attention`) reads
the cache where it lies: one softmax over the cache and the chunk, grouped-query heads by reshaping the queries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..errors import EdgeAttnError, InvalidArgument
from . import hf_lm


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache: ``window`` keys a query sees back, itself included (None: all), and the first ``sinks``
    positions (StreamingLLM's attention sinks), in ``slots`` slots.  A ``ring`` keeps the sinks in the first slots
    and position p >= sinks at slot ``sinks + (p - sinks) mod window``."""

    window: Optional[int]
    slots: int
    sinks: int = 0

    @property
    def ring(self) -> bool:
        return self.window is not None and self.slots == self.sinks + self.window

    def slot_positions(self, position: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, slots) each: the position each slot holds once positions up to ``end`` - 1 (B, 1) are written (for a
        ring, the newest of its class), and whether it holds one yet (a ring slot's class may have no position at
        or past the sinks yet: those below go to the sink slots)."""
        slot = torch.arange(self.slots, device=position.device)[None]
        if not self.ring:
            key_pos = slot.expand(position.shape[0], -1)
            return key_pos, key_pos < end
        assert self.window is not None
        newest = end - 1 - torch.remainder(end - 1 - slot, self.window)  # the newest position of the slot's class
        key_pos = torch.where(slot < self.sinks, slot, newest)
        return key_pos, (key_pos >= 0) & (key_pos < end) & ((slot < self.sinks) | (key_pos >= self.sinks))


def layer_windows(config) -> list[Optional[int]]:
    """Each layer's sliding window as the config declares it (``layer_types`` where it has them: Gemma 2 and 3,
    Qwen2; else ``sliding_window`` on every layer: Mistral), None for a global layer."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise InvalidArgument(
                f"{type(config).__name__} has layer types {sorted(unknown)}; export_lm knows sliding_attention "
                f"and full_attention layers"
            )
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [window] * layers


def cache_plan(config, max_cache_len: int, caches: str = "window", sinks: int = 0) -> list[LayerCache]:
    """Each layer's cache: a ring of its sinks and window where it slides and they are shorter than
    ``max_cache_len`` (``caches="window"``), else ``max_cache_len`` slots (every layer with ``caches="full"``).
    ``sinks`` apply to sliding layers (a global layer sees every position anyway)."""
    plan = []
    for window in layer_windows(config):
        if window is None:
            plan.append(LayerCache(None, max_cache_len))
            continue
        ring = caches == "window" and sinks + window < max_cache_len
        plan.append(LayerCache(window, sinks + window if ring else max_cache_len, sinks))
    return plan


class StepCache:
    """What transformers' layers see as their cache while a step runs: ``update`` keeps the new keys and values
    (the step's outputs) and hands them on; attention takes the past from here (:func:`cached_attention`), so the
    cache is never concatenated with them (a copy of it per token)."""

    def __init__(self, past_keys, past_values):
        self.past_keys, self.past_values = list(past_keys), list(past_values)
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new[layer_idx] = (key, value)
        return key, value

    # the sizes transformers asks for to build masks, which the step builds itself (see edgeattn_mask)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def outputs(self) -> list[torch.Tensor]:
        return [t for i in sorted(self.new) for t in self.new[i]]


def step_mask(layer: LayerCache, position: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, 1, C, slots + C) boolean: which cache slots, then which of the chunk's keys, each query may see."""
    p = position[:, None]  # (B, 1)
    key_pos, cached = layer.slot_positions(p, p)  # what each slot holds before this chunk
    i = torch.arange(chunk, device=position.device)
    query_pos = p + i[None]  # (B, C)
    seen = cached[:, None, :].expand(-1, chunk, -1)
    inside = (i[None, :] <= i[:, None])[None]  # the chunk's own keys, causal: a constant
    if layer.window is not None:
        seen = seen & (query_pos[:, :, None] - key_pos[:, None, :] < layer.window)
        inside = inside & (i[:, None] - i[None, :] < layer.window)
        if layer.sinks:  # and the sinks, whatever the distance
            seen = seen | (cached & (key_pos < layer.sinks))[:, None, :]
            inside = inside | ((i[None, :] <= i[:, None]) & (query_pos[:, None, :] < layer.sinks))
    inside = inside.expand(position.shape[0], -1, -1)
    return torch.cat([seen, inside], dim=2)[:, None]


def written(layer: LayerCache, past: torch.Tensor, new: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The cache after a chunk: ``past`` (B, H, slots, D) with the chunk's C keys ``new`` (B, H, C, D) of positions
    position[b] + j written at their slots (a ring keeps the newest of each slot)."""
    chunk = new.shape[2]
    p = position[:, None]  # (B, 1)
    key_pos, held = layer.slot_positions(p, p + chunk)  # the newest position that lands on each slot
    index = key_pos - p
    fresh = held & (index >= 0)  # one of the chunk's
    index = index.clamp(0, chunk - 1)[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
    return torch.where(fresh[:, None, :, None], torch.gather(new, 2, index), past)


def cached_attention(query, keys: tuple, values: tuple, mask, scale: Optional[float], softcap: Optional[float]):
    """Attention of query (B, H, C, D) over the cache's keys and the chunk's, ``keys`` = (past (B, Hkv, S, D), new
    (B, Hkv, C, D)) and the same for ``values``, with ``mask`` (B, 1, C, S + C): one softmax over both parts without
    concatenating them, and grouped-query heads by reshaping the queries, so the cache is read, never copied.  Query
    head h uses key/value head h // (H / Hkv), as transformers' repeat_kv has it; softcap before the mask."""
    batch, heads, chunk, dim = query.shape
    kv_heads = keys[0].shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * chunk, dim) * (dim**-0.5 if scale is None else scale)
    scores, edge = [], 0
    for key in keys:
        score = (grouped @ key.transpose(-1, -2)).reshape(batch, heads, chunk, key.shape[2])
        if softcap:
            score = softcap * torch.tanh(score / softcap)
        scores.append(score.masked_fill(~mask[..., edge : edge + key.shape[2]], float("-inf")))
        edge += key.shape[2]
    # finite: every query sees itself among the chunk's keys
    top = torch.maximum(scores[0].amax(-1, keepdim=True), scores[1].amax(-1, keepdim=True))
    weights = [torch.exp(score - top) for score in scores]
    total = weights[0].sum(-1, keepdim=True) + weights[1].sum(-1, keepdim=True)
    out = sum(
        (w.reshape(batch, kv_heads, -1, w.shape[-1]) @ v).reshape(batch, heads, chunk, dim)
        for w, v in zip(weights, values)
    )
    return out / total


class Step(nn.Module):
    """input_ids (B, C), position (B,): each row's first position, past keys and values (B, kv_heads, slots, D) in
    the order of :func:`cache_names` -> logits (B, C, vocab), the chunk's keys and values (B, kv_heads, C, D)."""

    def __init__(self, model: nn.Module, plan: list[LayerCache]):
        super().__init__()
        self.model, self.plan = model, plan

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *past: torch.Tensor):
        return self.step(input_ids, position, past)

    def step(self, input_ids: torch.Tensor, position: torch.Tensor, past) -> tuple:
        chunk = input_ids.shape[1]
        masks = {}  # one per distinct layer cache, shared by the layers that have it

        def attend(module, query, key, value, scaling, softcap, kwargs):
            layer = self.plan[module.layer_idx]
            declared = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            if declared != layer.window:
                raise EdgeAttnError(
                    f"layer {module.layer_idx} ({type(module).__name__}) attends with sliding_window={declared}, "
                    f"its config declares {layer.window}: export_lm cannot size its cache"
                )
            if layer not in masks:
                masks[layer] = step_mask(layer, position, chunk)
            past_key, past_value = cache.past_keys[module.layer_idx], cache.past_values[module.layer_idx]
            return cached_attention(query, (past_key, key), (past_value, value), masks[layer], scaling, softcap)

        cache = StepCache(past[0::2], past[1::2])
        positions = position[:, None] + torch.arange(chunk, device=input_ids.device)[None]
        token = hf_lm.STEP.set(attend)
        try:
            logits = self.model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True).logits
        finally:
            hf_lm.STEP.reset(token)
        return (logits, *cache.outputs())


class StatefulStep(nn.Module):
    """A :class:`Step` as a stateful model keeps it (OpenVINO GenAI's ``LLMPipeline``): input_ids (B, C),
    attention_mask, position_ids (B, C) and the caches -> logits and the caches with the chunk written in (which the
    runtime keeps as its state, in place).  Rows start at position_ids[:, 0]; attention_mask is taken for the
    pipeline's sake (positions and each layer's cache say which keys a query sees)."""

    def __init__(self, step: Step):
        super().__init__()
        self.inner = step

    def forward(self, input_ids, attention_mask, position_ids, *past):
        position = position_ids[:, 0]
        logits, *new = self.inner.step(input_ids, position, past)
        caches = [written(self.inner.plan[i // 2], past[i], t, position) for i, t in enumerate(new)]
        return (logits, *caches)


def prepare(model: nn.Module) -> nn.Module:
    """A copy of the transformers causal LM on the ``"edgeattn"`` attention implementation, in eval mode."""
    if not hf_lm.is_causal_lm(model):
        raise InvalidArgument(
            f"export_lm exports transformers causal LMs (AutoModelForCausalLM), got {type(model).__name__}"
        )
    hf_lm.register()
    copied: Any = copy.deepcopy(model).eval()  # a transformers PreTrainedModel
    copied.set_attn_implementation(hf_lm.NAME)
    return copied


def cache_names(layers: int, prefix: str) -> list[str]:
    """Optimum's names: ``past_key_values.N.key`` / ``.value`` (inputs), ``present.N.key`` / ``.value`` (outputs:
    here the chunk's new keys and values only)."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
