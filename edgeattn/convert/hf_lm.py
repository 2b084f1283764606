"""transformers causal LMs -> edgeattn: an ``"edgeattn"`` attention implementation with static prefill tables.

:func:`register` adds ``"edgeattn"`` to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (what a model's ``create_causal_mask`` / ``create_sliding_window_causal_mask`` return),
so ``AutoModelForCausalLM.from_config(config, attn_implementation="edgeattn")`` works; :func:`edgeattn.convert`
registers before it switches a model.  Nothing happens at ``import edgeattn``: importing transformers' modeling code
takes seconds, and users who never touch transformers pay nothing.

The mask interface hands the attention function the mask function transformers composed (causal, sliding window,
padding...), its key (see :func:`mask_key`) and the dense boolean mask.  :func:`convert` runs the model once at the
example length, compiles one :class:`~edgeattn.layers.MaskTable` per distinct mask (``model.edgeattn_masks``, so
export's plan sees and lowers them: blocked for sparse sliding windows) and from then on a prefill of that length
attends through the tables.  Any other call (another length, a cache offset, padding) attends over the dense mask,
which export keeps as a graph computation.  Inside an LM step (:mod:`edgeattn.convert.lm_step`, what
:func:`edgeattn.export_lm` exports) the step builds the masks itself, from positions and each layer's cache.
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..attention import masked_attention
from ..errors import EdgeAttnError, InvalidArgument, RuntimeUnavailable
from ..layers import MaskTable
from ..masks.base import custom

NAME = "edgeattn"
# convert's calibration run: attention module -> the HFMask it attended with
_RECORDING: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("edgeattn_hf_recording", default=None)
# a fixed-shape LM step (edgeattn.convert.lm_step) attends itself: (module, q, k, v, scaling, softcap, kwargs) -> out
STEP: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("edgeattn_hf_step", default=None)


@dataclass(frozen=True, eq=False)
class HFMask:
    """What the mask interface returns: transformers' mask function, its key when it is a static pattern of the
    positions only (None when it depends on the input: padding, a cache offset), and the dense (B, 1, Nq, Nkv) mask
    (None inside an LM step, which builds its masks from positions)."""

    mask_function: Callable
    key: Optional[tuple]
    dense: Optional[torch.Tensor]


def mask_key(fn) -> Optional[tuple]:
    """A hashable identity of a mask function built from transformers' factories (closures over ints and other
    mask functions): equal keys mean the same pattern.  None when it captures anything else (a padding tensor)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    parts: list = [code]
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, (bool, int, float, str, type(None))):
                parts.append(v)
            elif callable(v) and (sub := mask_key(v)) is not None:
                parts.append(sub)
            else:
                return None
    return tuple(parts)


def edgeattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> HFMask:
    """transformers' mask interface: the mask as an :class:`HFMask`."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    if STEP.get() is not None:
        return HFMask(mask_function, None, None)
    kwargs.pop("allow_is_causal_skip", None)  # we always need the mask itself, never sdpa's is_causal shortcut
    kwargs.pop("allow_is_bidirectional_skip", None)
    dense = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )
    # a static table covers a prefill from position 0 without padding; anything else depends on the input
    static = (
        _no_padding(attention_mask)
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == kv_offset == 0
        and q_length == kv_length
    )
    return HFMask(mask_function, mask_key(mask_function) if static else None, dense)


def _no_padding(attention_mask: Optional[torch.Tensor]) -> bool:
    """No 2-D padding mask, or one of all ones looked at in eager mode (a traced one is an input: it may pad)."""
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    return bool(attention_mask.all())


def edgeattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    **kwargs,
):
    """transformers' attention interface: q (B, H, Nq, D), k/v (B, Hkv, Nkv, D) -> ((B, Nq, H, D), None)."""
    where = type(module).__name__
    if dropout and module.training:
        raise EdgeAttnError(
            f"{where} asks for attention dropout {dropout} in training mode; edgeattn's attention "
            f"is for inference and export: call model.eval()"
        )
    if kwargs.get("output_attentions"):
        raise EdgeAttnError(
            "edgeattn's attention does not return attention weights; use attn_implementation="
            "'eager' for output_attentions=True"
        )
    step = STEP.get()
    if step is not None:
        return step(module, query, key, value, scaling, softcap, kwargs).transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` consecutive query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if isinstance(attention_mask, HFMask):
        table = getattr(module, "_edgeattn_tables", {}).get(attention_mask.key)
        if table is not None and (query.shape[2], key.shape[2]) == (table.shape.q_len, table.shape.kv_len):
            out = table(query, key, value, scale=scaling, softcap=softcap)
        else:
            recording = _RECORDING.get()
            if recording is not None:
                recording[module] = attention_mask
            assert attention_mask.dense is not None  # None only inside an LM step
            out = masked_attention(query, key, value, attention_mask.dense, scale=scaling, softcap=softcap)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        out = masked_attention(query, key, value, attention_mask, scale=scaling, softcap=softcap)
    else:
        got = "no mask" if attention_mask is None else f"a {type(attention_mask).__name__}"
        raise EdgeAttnError(
            f"{where} got {got} as its attention mask; edgeattn needs the mask transformers builds "
            f"through its mask interface (pass a 2-D attention_mask of 0/1, or a 4-D boolean one)"
        )
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- registration
def register() -> None:
    """Register ``"edgeattn"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, so that
    ``from_config(config, attn_implementation="edgeattn")`` builds a model on it.  :func:`edgeattn.convert` calls it
    for a transformers model; call it yourself before building one with that name.  Idempotent."""
    try:
        from transformers import masking_utils, modeling_utils
    except ImportError:
        raise RuntimeUnavailable(
            "edgeattn's transformers attention needs transformers: pip install 'edgeattn[transformers]'"
        ) from None
    masking_utils.AttentionMaskInterface.register(NAME, edgeattn_mask)
    modeling_utils.AttentionInterface.register(NAME, edgeattn_attention)


# ----------------------------------------------------------------------------- convert
def is_causal_lm(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: the module cannot be one of its models
    return (
        transformers is not None
        and isinstance(module, transformers.PreTrainedModel)
        and module.can_generate()
        and not getattr(module.config, "is_encoder_decoder", False)
    )


def refuse_part(module: nn.Module) -> None:
    """Refuse a part of a transformers model that holds its attention (``LlamaAttention``, a decoder layer): the
    model computes their mask and position embeddings and hands them down, and ``"edgeattn"`` is switched on the
    model, so the model is what convert takes.  Recognised by what transformers' decoder attention has (``is_causal``
    True, ``layer_idx``), on a module of transformers' modeling code that is not a model itself."""
    transformers = sys.modules.get("transformers")  # not imported: the module cannot be one of its parts
    if (
        transformers is None
        or isinstance(module, transformers.PreTrainedModel)
        or not type(module).__module__.startswith("transformers.")
    ):
        return
    attention = next(
        (
            m
            for m in module.modules()
            if getattr(m, "is_causal", False) is True
            and hasattr(m, "layer_idx")
            and type(m).__module__.startswith("transformers.")
        ),
        None,
    )
    if attention is not None:
        who = "it" if attention is module else f"its {type(attention).__name__}"
        raise InvalidArgument(
            f"{type(module).__name__} is part of a transformers model: {who} gets the attention mask and "
            f"position embeddings from the model that holds it, so convert that model instead, "
            f"convert(model, input_ids) on the ...ForCausalLM"
        )


def convert(module: nn.Module, example_inputs: tuple, layout: str) -> list[str]:
    """Switch a transformers causal LM to ``"edgeattn"`` and compile its prefill tables for the example length."""
    if not is_causal_lm(module):
        return []
    if (
        len(example_inputs) != 1
        or not isinstance(example_inputs[0], torch.Tensor)
        or example_inputs[0].ndim != 2
        or example_inputs[0].is_floating_point()
    ):
        raise EdgeAttnError(
            f"convert takes one example input for {type(module).__name__}: input_ids, an integer "
            f"tensor (batch, prompt_len); tables are compiled for that prompt length"
        )
    input_ids = example_inputs[0]
    register()
    module.set_attn_implementation(NAME)
    recorded: dict = {}
    token = _RECORDING.set(recorded)
    try:
        with torch.no_grad():
            module(input_ids=input_ids, use_cache=False)
    finally:
        _RECORDING.reset(token)
    tables: dict = {}  # mask key -> MaskTable
    lines = []
    for name, m in module.named_modules():
        if m not in recorded:
            continue
        mask = recorded[m]
        if mask.key is None:
            raise EdgeAttnError(
                f"{name} ({type(m).__name__}) attends with a mask that depends on the input "
                f"(padding, token types), which a static table cannot hold"
            )
        if mask.key not in tables:
            label = _label(mask.dense[0, 0])
            # a sliding window no shorter than the prompt is causal at this length: still its own table
            label = label if label not in {t.mask.name for t in tables.values()} else f"{label}_{len(tables)}"
            tables[mask.key] = MaskTable(
                custom(mask.mask_function, name=label),
                m.config.num_attention_heads,
                q_len=input_ids.shape[1],
                layout=layout,
            )
        table = tables[mask.key]
        m._edgeattn_tables = tables  # a plain dict: the tables are registered once, under edgeattn_masks
        lines.append(
            f"{name}: transformers {type(m).__name__} -> edgeattn {table.mask.name} "
            f"({input_ids.shape[1]} tokens, {table.layout})"
        )
    module.edgeattn_masks = nn.ModuleDict({t.mask.name: t for t in tables.values()})
    # a plain forward returns logits only, so export_onnx(model, (input_ids,)) writes input_ids -> logits (a
    # transformers cache is no output a graph can have); generate() keeps its cache (generation_config.use_cache)
    module.config.use_cache = False
    return lines


def _label(pattern: torch.Tensor) -> str:
    """A readable name for a prefill pattern (Nq, Nkv): causal, sliding_window_W (W keys back, query included)."""
    q = torch.arange(pattern.shape[0])[:, None]
    kv = torch.arange(pattern.shape[1])[None, :]
    if torch.equal(pattern, kv <= q):
        return "causal"
    window = int((q - kv)[pattern].max()) + 1 if pattern.any() else 0
    if torch.equal(pattern, (kv <= q) & (kv > q - window)):
        return f"sliding_window_{window}"
    return "mask"
