"""A transformers causal LM -> a folder of fixed-shape files: ``prefill.onnx`` (a chunk of tokens per call),
``decode.onnx`` (one token) and ``edgeattn_lm.json``; the LM export workflow over :mod:`edgeattn.convert.lm_step`
(the step, its caches and masks) and :func:`edgeattn.export.export_onnx`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .. import lmloop
from ..convert.lm_step import Step, cache_names, cache_plan, prepare
from ..errors import InvalidArgument
from ..files import atomic_write
from .exporter import export_onnx


def export_lm(
    model: torch.nn.Module,
    folder,
    *,
    chunk: int = 16,
    max_cache_len: int = 256,
    caches: str = "window",
    batch: Optional[int] = None,
    **export_kwargs,
) -> Path:
    """Export a transformers causal LM to ``folder`` for :func:`edgeattn.generate` (or :mod:`edgeattn.lmloop` on a
    device): any prompt length through fixed shapes.

    ``prefill.onnx`` takes ``chunk`` tokens per row and call (a prompt goes in chunks, the last one padded),
    ``decode.onnx`` one; both take ``input_ids`` (B, C), ``position`` (B,): each row's first position, and
    ``past_key_values.N.key/value``, and return ``logits`` (B, C, vocab) and ``present.N.key/value``: the C new keys
    and values only, which the host writes into its cache.  Each layer's cache is sized by its own attention
    (``caches="window"``): a ring of its window where it slides (Mistral, Gemma's local layers), ``max_cache_len``
    slots where it is global, so a sliding layer's cost per token does not grow with the context; ``caches="full"``
    gives every layer ``max_cache_len`` slots.  ``batch`` fixes the batch size (what NPUs want; default: any).
    ``edgeattn_lm.json`` records the caches, the chunk and the stop tokens.  ``export_kwargs`` go to
    :func:`edgeattn.export_onnx` (opset, lowering, dtype...).  Returns the folder."""
    if not (isinstance(chunk, int) and isinstance(max_cache_len, int) and 0 < chunk <= max_cache_len):
        raise InvalidArgument(
            f"export_lm needs integers 0 < chunk <= max_cache_len, got chunk={chunk!r}, max_cache_len={max_cache_len!r}"
        )
    if caches not in ("window", "full"):
        raise InvalidArgument(f"caches must be 'window' (each layer's own window) or 'full', got {caches!r}")
    if batch is not None and not (isinstance(batch, int) and batch > 0):
        raise InvalidArgument(f"batch must be a positive integer (or None: any batch), got {batch!r}")
    for taken in ("input_names", "output_names", "dynamic_batch", "batch_axes"):
        if taken in export_kwargs:
            raise InvalidArgument(f"export_lm sets {taken} itself; leave it out")
    config: Any = getattr(model, "config", None)  # a transformers config (prepare refuses anything else)
    step = Step(prepare(model), cache_plan(config, max_cache_len, caches))
    text = config.get_text_config()
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rows = batch or 1
    past = [torch.zeros(rows, kv_heads, layer.slots, head_dim) for layer in step.plan for _ in ("key", "value")]
    layers = len(step.plan)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tokens in (("prefill", chunk), ("decode", 1)):
        export_onnx(
            step,
            (torch.zeros(rows, tokens, dtype=torch.long), torch.zeros(rows, dtype=torch.long), *past),
            folder / f"{name}.onnx",
            input_names=["input_ids", "position", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_batch=batch is None,
            **export_kwargs,
        )
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else text.eos_token_id
    pad = getattr(generation, "pad_token_id", None) if generation is not None else None
    described = {
        "chunk": chunk,
        "max_cache_len": max_cache_len,
        "batch": batch,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
        "eos_token_id": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "pad_token_id": pad if pad is not None else text.pad_token_id or 0,
        "layers": [{"window": layer.window, "slots": layer.slots} for layer in step.plan],
    }
    atomic_write(folder / lmloop.CONFIG, (json.dumps(described, indent=2) + "\n").encode())
    return folder
