"""edgeattn: masked attention from PyTorch to onnxruntime and OpenVINO, with static mask tables.

The package reads bottom-up in floors (see ``tests/test_floors.py``): base (errors, files, the node's signature,
the LM host loop) -> core (masks, tables, the torch op, layers, routing, decisions) -> converters -> file format ->
runtimes -> export -> registered models -> the tools users call (parity, bench, inspection, plots, serve,
generation, the CLI).  This module, the front door, sits on top and imports from all of them."""

from . import masks, parity, tables
from .attention import masked_attention
from .convert import convert
from .errors import BadFile, EdgeAttnError, ExportFailed, InvalidArgument, NoSuchLowering, RuntimeUnavailable
from .export import export_lm, export_onnx
from .generation import generate
from .layers import MaskedSelfAttention
from .masks import and_masks, materialize, or_masks
from .plots import plot_mask
from .runtimes import load, runtime_names
from .version import __version__

__all__ = [
    "__version__",
    "masks",
    "parity",
    "tables",
    "masked_attention",
    "EdgeAttnError",
    "MaskedSelfAttention",
    "and_masks",
    "or_masks",
    "materialize",
    "convert",
    "export_lm",
    "export_onnx",
    "generate",
    "load",
    "runtime_names",
    "plot_mask",
    "InvalidArgument",
    "BadFile",
    "RuntimeUnavailable",
    "ExportFailed",
    "NoSuchLowering",
]
