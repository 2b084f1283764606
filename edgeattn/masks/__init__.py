"""Mask families.  Each factory returns a :class:`Mask`; ``FAMILIES`` lists them for the CLI and the tests."""

import inspect
from typing import Callable

from ..errors import InvalidArgument
from .base import Mask, Shape, and_masks, as_mask, custom, materialize, or_masks
from .clear import clear
from .decay import decay_1d, manhattan_decay
from .neighborhood import neighborhood
from .radial import radial
from .sequence import causal, segments, sinks, sliding_window
from .window import window

# name -> (factory, one-line description); what `edgeattn masks` prints
FAMILIES: dict[str, tuple[Callable[..., Mask], str]] = {
    "causal": (causal, "key not after the query"),
    "sliding_window": (sliding_window, "0 <= q-k <= window (causal) or |q-k| <= window"),
    "sinks": (sinks, "causal; first n_sink keys plus a window back (StreamingLLM)"),
    "segments": (segments, "prefill: bidirectional inside a segment, causal across"),
    "neighborhood": (neighborhood, "NATTEN neighborhood on 1-3D grids: kernel, dilation, stride, causal, rpb"),
    "window": (window, "Swin windows and shifted windows on a 2-D grid, rpb"),
    "manhattan_decay": (manhattan_decay, "RMT: all keys, per-head bias log(gamma) * Manhattan distance on a grid"),
    "decay_1d": (decay_1d, "RetNet/RMT: all keys, per-head bias log(gamma) * |q-k| on a sequence"),
    "radial": (radial, "Radial Attention: video frames, band shrinking with frame distance, block-sparse, sink"),
    "clear": (clear, "CLEAR: circular local window dy^2+dx^2 < r^2 on the image grid, text tokens dense"),
}

__all__ = [
    "Mask",
    "Shape",
    "and_masks",
    "or_masks",
    "as_mask",
    "custom",
    "materialize",
    "FAMILIES",
    "causal",
    "sliding_window",
    "sinks",
    "segments",
    "neighborhood",
    "window",
    "manhattan_decay",
    "decay_1d",
    "radial",
    "clear",
    "from_params",
    "parse_value",
]


def from_params(family: str, params=()) -> Mask:
    """The mask of a registered family from ``NAME=VALUE`` strings (``edgeattn masks show``): ``kernel=7``,
    ``kernel=7x5`` or ``3,5`` (per-axis tuples), ``causal=true``, ``gammas=0.9,0.95``.  Errors name the family's
    parameters."""
    if family not in FAMILIES:
        raise InvalidArgument(f"unknown mask family {family!r}; choose from: {', '.join(FAMILIES)}")
    factory = FAMILIES[family][0]
    signature = inspect.signature(factory).parameters.values()
    takes = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in signature)
    takes = f"{family} takes {takes or 'no parameters'}"
    names = [p.name for p in signature]
    kwargs = {}
    for item in params:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in names:
            raise InvalidArgument(f"{takes}; got {item!r} (give NAME=VALUE)")
        try:
            kwargs[name] = parse_value(text)
        except ValueError as e:
            raise InvalidArgument(f"{family} parameter {name}: {e}") from None
    missing = [p.name for p in signature if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise InvalidArgument(f"{family} needs {', '.join(missing)}; {takes}")
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{family}: {str(e).splitlines()[0]} ({takes})") from None


def parse_value(text: str):
    """A parameter value as written on a command line: an int, a float, true/false, or a tuple of those written
    ``7x5`` or ``3,5``."""
    for sep in (",", "x"):
        if sep in text:
            return tuple(_scalar(part) for part in text.split(sep))
    return _scalar(text)


def _scalar(text: str):
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise InvalidArgument(f"cannot read {text!r}: give an integer, a number, true/false, or a tuple such as 7x5 or 3,5")
