"""A transformers causal LM -> a folder of fixed-shape files: ``prefill.onnx`` (a chunk of tokens per call),
``decode.onnx`` (one token) and ``edgeattn_lm.json``; the LM export workflow over :mod:`edgeattn.convert.lm_step`
(the step, its caches and masks) and :func:`edgeattn.export.export_onnx`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from .. import lmloop
from ..convert.lm_step import StatefulStep, Step, cache_names, cache_plan, prepare
from ..errors import InvalidArgument
from ..files import atomic_write
from . import genai
from .exporter import export_checked, export_onnx
from .request import check_request

GENAI_OPTIONS = ("dtype", "opset", "lowering")  # the export options the OpenVINO GenAI IR takes


def export_lm(
    model: torch.nn.Module,
    folder,
    *,
    chunk: int = 16,
    max_cache_len: int = 256,
    caches: str = "window",
    batch: Optional[int] = None,
    sinks: int = 0,
    openvino_genai: bool = False,
    tokenizer=None,
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
    ``sinks`` > 0 makes every sliding layer also keep and see the first ``sinks`` positions (StreamingLLM's
    attention sinks), which changes what the model computes once a prompt outgrows the window.
    ``edgeattn_lm.json`` records the caches, the chunk and the stop tokens.

    ``openvino_genai=True`` also writes the folder OpenVINO GenAI's ``LLMPipeline`` runs: ``openvino_model.xml``, a
    stateful IR whose variables are these same caches (written in place by the runtime), ``generation_config.json``
    and, given the transformers ``tokenizer``, its OpenVINO tokenizer IRs (see :mod:`edgeattn.export.genai`).
    ``export_kwargs`` go to :func:`edgeattn.export_onnx` (opset, lowering, dtype...; the IR takes dtype, opset and
    lowering).  Returns the folder."""
    if not (isinstance(chunk, int) and isinstance(max_cache_len, int) and 0 < chunk <= max_cache_len):
        raise InvalidArgument(
            f"export_lm needs integers 0 < chunk <= max_cache_len, got chunk={chunk!r}, max_cache_len={max_cache_len!r}"
        )
    if caches not in ("window", "full"):
        raise InvalidArgument(f"caches must be 'window' (each layer's own window) or 'full', got {caches!r}")
    if not (isinstance(sinks, int) and sinks >= 0):
        raise InvalidArgument(f"sinks must be a non-negative integer, got {sinks!r}")
    if batch is not None and not (isinstance(batch, int) and batch > 0):
        raise InvalidArgument(f"batch must be a positive integer (or None: any batch), got {batch!r}")
    for taken in ("input_names", "output_names", "dynamic_batch", "batch_axes"):
        if taken in export_kwargs:
            raise InvalidArgument(f"export_lm sets {taken} itself; leave it out")
    config: Any = getattr(model, "config", None)  # a transformers config (prepare refuses anything else)
    if tokenizer is not None and not openvino_genai:
        raise InvalidArgument("a tokenizer goes with openvino_genai=True (export_lm converts it for OpenVINO GenAI)")
    step = Step(prepare(model), cache_plan(config, max_cache_len, caches, sinks))
    described = _described(model, step.plan, chunk=chunk, max_cache_len=max_cache_len, batch=batch)
    shape = (batch or 1, described["kv_heads"], described["head_dim"])
    past = [torch.zeros(shape[0], shape[1], layer.slots, shape[2]) for layer in step.plan for _ in ("key", "value")]
    layers = len(step.plan)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # written last: until then no config claims the folder, so an export cut short is never taken for a whole one
    (folder / lmloop.CONFIG).unlink(missing_ok=True)
    for name, tokens in (("prefill", chunk), ("decode", 1)):
        export_onnx(
            step,
            (torch.zeros(shape[0], tokens, dtype=torch.long), torch.zeros(shape[0], dtype=torch.long), *past),
            folder / f"{name}.onnx",
            input_names=["input_ids", "position", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_batch=batch is None,
            **export_kwargs,
        )
    if openvino_genai:
        genai_kwargs = {k: v for k, v in export_kwargs.items() if k in GENAI_OPTIONS}
        _export_stateful(StatefulStep(step), past, batch, folder, described, tokenizer, genai_kwargs)
    atomic_write(folder / lmloop.CONFIG, (json.dumps(described, indent=2) + "\n").encode())
    return folder


def _described(model, plan, **fields) -> dict:
    """What ``edgeattn_lm.json`` holds: the export's settings, the cache shapes and the stop and padding tokens."""
    text = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else text.eos_token_id
    pad = getattr(generation, "pad_token_id", None) if generation is not None else None
    return {
        **fields,
        "kv_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "vocab_size": text.vocab_size,
        "eos_token_id": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "pad_token_id": pad if pad is not None else text.pad_token_id or 0,
        "layers": [{"window": layer.window, "slots": layer.slots, "sinks": layer.sinks} for layer in plan],
    }


def _export_stateful(step, past, batch, folder: Path, described: dict, tokenizer, export_kwargs: dict) -> None:
    """The OpenVINO GenAI files: the stateful step exported with any number of tokens (the pipeline feeds a whole
    prompt, then one token), turned into the stateful IR."""
    rows, tokens = batch or 2, 3  # sizes of 1 would be traced as constants
    example = (
        torch.zeros(rows, tokens, dtype=torch.long),
        torch.ones(rows, tokens + 5, dtype=torch.long),  # attention_mask: past and new tokens
        torch.arange(5, 5 + tokens).expand(rows, tokens),
        *(t.expand(rows, *t.shape[1:]) for t in past),
    )
    rows_axis = {} if batch else {0: "batch"}
    axes = [{**rows_axis, 1: "tokens"}, {**rows_axis, 1: "total"}, {**rows_axis, 1: "tokens"}]
    layers = len(past) // 2
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "stateful.onnx"
        export_checked(
            step,
            example,
            onnx_path,
            check_request(path=onnx_path, **export_kwargs),  # standard ops: the IR has no edgeattn node
            input_names=["input_ids", "attention_mask", "position_ids", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            named_axes=axes + [rows_axis or None] * len(past),
        )
        generation = {"pad_token_id": described["pad_token_id"]}
        if described["eos_token_id"]:
            generation["eos_token_id"] = described["eos_token_id"]
        genai.write(onnx_path, folder, generation, tokenizer)
