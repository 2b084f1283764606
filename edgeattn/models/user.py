"""A user's own model on the command line: ``edgeattn export my_pkg.models:build --input x=1x3x224x224 -o m.onnx``.

A spec names a Python callable or module object, ``package.module:name`` (imported, with the current directory on
the path) or ``path/to/file.py:name``;
called without arguments (an ``nn.Module`` instance is used as is) it gives the ``nn.Module`` to export.  Inputs
are declared ``NAME=SHAPE[:DTYPE]`` (``x=1x3x224x224``, ``input_ids=1x128:int64``): floats are drawn from a normal
distribution, integers from [0, 100), from the seed.  A copy of the module goes through :func:`edgeattn.convert`
and is what gets exported (FlexAttention calls, NATTEN modules and transformers models get edgeattn's tables; a
module built from edgeattn's layers stays as it is); the original module is the PyTorch reference of checks.

Building runs the user's code: a file's metadata naming such a spec is only rebuilt when the caller trusts it
(``edgeattn check --trust-code``), as transformers' ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch

from ..convert import convert, hf_lm
from ..convert.lm_step import StepCache
from ..errors import EdgeAttnError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
INT_HIGH = 100  # integer inputs are drawn from [0, INT_HIGH)


def is_spec(name: str) -> bool:
    """Whether a model argument is a user's ``module:callable`` rather than a registered name."""
    return ":" in name


def load(spec: str):
    """The object a spec names (not yet called)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise EdgeAttnError(f"model {spec!r}: give package.module:callable or path/to/file.py:callable")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise EdgeAttnError(f"model {spec!r}: no file {path}")
        module_name = f"edgeattn_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise EdgeAttnError(f"model {spec!r}: running {path} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as uvicorn and gunicorn do: the spec names a module from here
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise EdgeAttnError(
                f"model {spec!r}: cannot import {where} ({e}); is it on PYTHONPATH or installed?"
            ) from e
    if not hasattr(module, attr):
        raise EdgeAttnError(f"model {spec!r}: {where} has no {attr!r}")
    return getattr(module, attr)


def parse_inputs(items) -> dict[str, str]:
    """``NAME=SHAPE[:DTYPE]`` strings -> {name: "SHAPE[:DTYPE]"} (validated; the form kept in the metadata)."""
    specs = {}
    for item in items or ():
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not name.isidentifier():
            raise EdgeAttnError(f"--input {item!r}: give NAME=SHAPE[:DTYPE], e.g. x=1x3x224x224 or ids=1x128:int64")
        if name in specs:
            raise EdgeAttnError(f"--input {name} is given twice")
        _shape_dtype(name, text)
        specs[name] = text
    if not specs:
        raise EdgeAttnError(
            "a model of your own needs its inputs: --input NAME=SHAPE[:DTYPE], repeatable, in the "
            "order forward() takes them (e.g. --input x=1x3x224x224)"
        )
    return specs


def _shape_dtype(name: str, text: str):
    shape_text, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise EdgeAttnError(f"--input {name}: unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        shape = tuple(int(d) for d in shape_text.replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape) or math.prod(shape) > 2**31:
        raise EdgeAttnError(
            f"--input {name}: shape {shape_text!r} must be positive integers joined by x, e.g. 1x3x224x224"
        )
    return shape, DTYPES[dtype]


def example_inputs(specs: dict[str, str], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, text in specs.items():
        shape, dtype = _shape_dtype(name, text)
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            out[name] = torch.randint(0, 2 if dtype == torch.bool else INT_HIGH, shape, generator=generator).to(dtype)
    return out


def build_module(spec: str, inputs: dict[str, torch.Tensor]):
    """The module the spec's object makes, and a copy with what edgeattn knows in it converted (the original stays
    the PyTorch reference a check compares the file with)."""
    made = load(spec)
    if not isinstance(made, torch.nn.Module):
        if not callable(made):
            raise EdgeAttnError(
                f"model {spec!r} is a {type(made).__name__}: name an nn.Module or a callable returning one"
            )
        try:
            made = made()
        except Exception as e:
            raise EdgeAttnError(f"model {spec!r}: calling it failed: {type(e).__name__}: {e}") from e
        if not isinstance(made, torch.nn.Module):
            raise EdgeAttnError(f"model {spec!r} returned a {type(made).__name__}, not a torch.nn.Module")
    made.eval()
    converted = convert(made, *inputs.values(), strict=False)
    if hf_lm.is_causal_lm(made):  # a transformers LM: logits for a prompt of the example's length, static tables
        made.config.use_cache = False  # the reference returns logits only, as the file does
        converted = PromptLogits(converted)
    return made, converted


class PromptLogits(torch.nn.Module):
    """A converted transformers causal LM as ``input_ids -> logits`` for a prompt from position 0, attending through
    the static tables compiled for its length (see :mod:`edgeattn.convert.hf_lm`).  The positions and an empty step
    cache are passed so that, under tracing, transformers builds the prompt's mask from its positions alone (without
    them it tests whether the positions pack several sequences, and that mask is no static pattern)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cache = StepCache((), ())  # hands each layer its own keys: attention over the prompt alone
        return self.model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True).logits
