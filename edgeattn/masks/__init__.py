"""Mask families.  Each factory returns a :class:`Mask`; ``FAMILIES`` lists them for the CLI and the tests."""
from .base import Mask, Shape, and_masks, as_mask, custom, materialize, or_masks
from .clear import clear
from .decay import decay_1d, manhattan_decay
from .neighborhood import neighborhood
from .radial import radial
from .sequence import causal, segments, sinks, sliding_window
from .window import window

# name -> (factory, one-line description); what `edgeattn masks` prints
FAMILIES = {
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

__all__ = ["Mask", "Shape", "and_masks", "or_masks", "as_mask", "custom", "materialize", "FAMILIES",
           "causal", "sliding_window", "sinks", "segments", "neighborhood", "window",
           "manhattan_decay", "decay_1d", "radial", "clear"]
