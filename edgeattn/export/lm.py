"""A transformers causal LM -> ``prefill.onnx`` and ``decode.onnx``: the LM export workflow, over the converter
(:mod:`edgeattn.convert.hf_lm`: the attention implementation, the static prefill tables, the export cache) and
:func:`edgeattn.export.export_onnx`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..convert import convert
from ..convert.hf_lm import DecodeStep, Prefill, cache_names, is_causal_lm
from ..errors import InvalidArgument
from .exporter import export_onnx


def export_lm(
    model: nn.Module, prompt_len: int, max_cache_len: int, folder, layout: str = "auto", **export_kwargs
) -> tuple[Path, Path]:
    """Export a transformers causal LM as ``prefill.onnx`` and ``decode.onnx`` in ``folder`` for greedy generation
    with a static cache of ``max_cache_len`` tokens.

    prefill: ``input_ids`` (1, prompt_len) -> ``logits`` (1, prompt_len, vocab), ``present.N.key/value`` (1,
    kv_heads, max_cache_len, head_dim), the prompt's keys in the first prompt_len slots.  decode: ``input_ids``
    (1, 1), ``cache_position`` (1,) (the token's position: prompt_len for the first step), ``past_key_values.N
    .key/value`` -> ``logits`` (1, 1, vocab) and the ``present.N.key/value`` to feed to the next step.  The prefill
    attends through static tables (see :func:`convert`), the decode step over a mask computed from cache_position.
    ``export_kwargs`` go to :func:`edgeattn.export_onnx` (opset, lowering, runtimes...)."""
    if not is_causal_lm(model):
        raise InvalidArgument(
            f"export_lm exports transformers causal LMs (AutoModelForCausalLM), got {type(model).__name__}"
        )
    if not (isinstance(prompt_len, int) and isinstance(max_cache_len, int) and 0 < prompt_len < max_cache_len):
        raise InvalidArgument(
            f"export_lm needs integers 0 < prompt_len < max_cache_len (the cache holds the prompt "
            f"and the generated tokens), got prompt_len={prompt_len!r}, "
            f"max_cache_len={max_cache_len!r}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = torch.zeros((1, prompt_len), dtype=torch.long)
    converted = convert(model, prompt, layout=layout).eval()
    layers = converted.config.get_text_config().num_hidden_layers
    with torch.no_grad():  # example past keys/values: the shapes the prefill returns
        past = [torch.zeros_like(t) for t in Prefill(converted, max_cache_len)(prompt)[1:]]
    export_onnx(
        Prefill(converted, max_cache_len),
        (prompt,),
        folder / "prefill.onnx",
        input_names=["input_ids"],
        output_names=["logits", *cache_names(layers, "present")],
        **export_kwargs,
    )
    step = (torch.zeros((1, 1), dtype=torch.long), torch.tensor([prompt_len]), *past)
    export_onnx(
        DecodeStep(converted, max_cache_len),
        step,
        folder / "decode.onnx",
        input_names=["input_ids", "cache_position", *cache_names(layers, "past_key_values")],
        output_names=["logits", *cache_names(layers, "present")],
        **export_kwargs,
    )
    return folder / "prefill.onnx", folder / "decode.onnx"
