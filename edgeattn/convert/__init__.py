"""Existing models -> edgeattn: attention written for other libraries, moved onto edgeattn's tables and op.

A user arrives with a model that exists: FlexAttention code, NATTEN modules, a Hugging Face transformers model.
:func:`convert` finds what it knows in the module and moves it onto edgeattn, keeping the weights, so the result
exports with :func:`edgeattn.export_onnx` and runs on onnxruntime and OpenVINO with the original's numbers.

One converter per source, each a module of this package with ``convert(module, example_inputs, layout) ->
list[str]``: it converts ``module`` in place and returns one line per thing it replaced (empty when it found
nothing).  They run in :data:`CONVERTERS` order.  A converter replaces a layer inside its parent, so :func:`convert`
gives a module that is itself such a layer (a NATTEN module, a transformers ``SwinLayer``: see :data:`LAYERS`) a
parent of its own for the time of the conversion, and returns what its converter put there.  (This package sits
right above the core: export runs the FlexAttention converter on a module that calls flex_attention itself.)
"""

from __future__ import annotations

import copy

import torch

from ..errors import ExportFailed, InvalidArgument
from . import flex, hf_lm, hf_vision, natten

# the converters, in the order they run
CONVERTERS = [natten, hf_vision, hf_lm, flex]
# module -> whether a converter replaces it whole (so it needs a parent to be replaced in)
LAYERS = [natten.is_layer, hf_vision.is_layer]
# the name the module given to convert has in the parent it gets when it is itself a layer: report lines read
# "(module): natten.NeighborhoodAttention2D -> ..."
ROOT = "(module)"


class _Holder(torch.nn.Module):
    """The parent of a module that is itself a layer a converter replaces, for the time of the conversion."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.add_module(ROOT, module)
        self.train(module.training)

    def forward(self, *args, **kwargs):
        return getattr(self, ROOT)(*args, **kwargs)


def convert(
    module: torch.nn.Module,
    *example_inputs,
    layout: str = "auto",
    inplace: bool = False,
    report: bool = False,
    strict: bool = True,
):
    """``module`` with its attention on edgeattn tables, ready for :func:`edgeattn.export_onnx`.

    ``example_inputs`` are the inputs the module will be exported with: tables are compiled for their shapes.
    ``layout`` (auto, dense, blocked) is the table layout of converted layers.  The original is left untouched
    unless ``inplace=True`` (as torch.ao's ``convert``).  ``report=True`` returns ``(module, lines)``, a line per
    replaced attention.  A module in which no converter finds anything is an error that says what is supported
    (``strict=False``: it is returned as it is, e.g. one already built from edgeattn's layers).

    ``module`` may itself be a layer that convert replaces: a NATTEN ``NeighborhoodAttention1D/2D/3D`` (called
    with one (B, *grid, C) tensor) or a transformers ``SwinLayer`` (called with ``(hidden_states, (height,
    width))``).  The result is then the replacing layer, with the same state-dict keys, and its report line is
    named ``(module)``.  No object can become another class, so there ``inplace=True`` means "no copy": the
    result holds the original's own Linears, norms and bias Parameters, and the module passed in is left as it
    was (use the returned one).  A transformers LM attention module (``LlamaAttention`` and the like) is refused:
    its mask and position embeddings come from the model that holds it, which is what to convert."""
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgument(f"convert takes a torch.nn.Module, got {type(module).__name__}")
    if layout not in ("auto", "dense", "blocked"):
        raise InvalidArgument(f"layout must be auto, dense or blocked, got {layout!r}")
    hf_lm.refuse_part(module)
    target = module if inplace else copy.deepcopy(module)
    root = target
    if any(is_layer(target) for is_layer in LAYERS):
        if not example_inputs:
            raise InvalidArgument(
                f"convert replaces the {type(module).__name__} it is given by a layer compiled for its input's "
                f"size: pass the inputs it will be exported with, convert(module, *inputs)"
            )
        root = _Holder(target)
    lines: list[str] = []
    for converter in CONVERTERS:
        lines += converter.convert(root, tuple(example_inputs), layout)
    if isinstance(root, _Holder):
        target = getattr(root, ROOT)
    if not lines and strict:
        if not example_inputs:
            raise InvalidArgument(
                f"convert found nothing to convert in {type(module).__name__} without example "
                f"inputs: pass the inputs the model will be exported with, convert(model, x)"
            )
        raise ExportFailed(
            f"convert found nothing to convert in {type(module).__name__}: it converts NATTEN's "
            f"NeighborhoodAttention1D/2D/3D modules, transformers models (Llama, Mistral, Gemma, Qwen, Swin, "
            f"Mask2Former) and modules that call torch.nn.attention.flex_attention.flex_attention; build other "
            f"attention from edgeattn.MaskedSelfAttention or edgeattn.masked_attention"
        )
    return (target, lines) if report else target


__all__ = ["convert", "CONVERTERS", "LAYERS"]
