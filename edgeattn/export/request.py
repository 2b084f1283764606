"""What an export is asked to write, validated once before any work: precision, opset, lowering, target runtimes.

The runtimes answer for themselves (:meth:`Runtime.not_supported_reasons` with ``here=False``: an export may target
a runtime this machine lacks); this module only turns their answers into one error that says what to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .. import runtimes
from ..errors import EdgeAttnError
from ..onnxfile import LOWERINGS, Contents
from .precision import check_opset, default_opset, precision_name

DEFAULT_OPSET = 18
OPSETS = range(17, 26)   # the opsets exported and run on onnxruntime and OpenVINO here
LOWERING_CHOICES = ("auto", *LOWERINGS)


@dataclass(frozen=True)
class ExportRequest:
    precision: str               # fp32, fp16, bf16, int8 or int8-static
    dtype: str                   # the compute dtype (fp32 for quantized files)
    quantize: Optional[str]
    opset: int
    lowering: str                # requested: auto or one of LOWERINGS
    targets: tuple[str, ...]     # the ONNX runtimes the file is for
    inline: bool = False
    dynamic_batch: bool = False


def check_request(*, dtype: str = "fp32", quantize: Optional[str] = None, opset: Optional[int] = None,
                  lowering: str = "auto", runtimes: Optional[Sequence[str]] = None, inline: bool = False,
                  dynamic_batch: bool = False) -> ExportRequest:
    """Validate an export request; the opset defaults for the dtype, the targets to every ONNX runtime that can run
    the precision (named targets that cannot are an error).  ``runtimes`` may name the torch reference, which
    checks files but is no target."""
    precision = precision_name(dtype, quantize)
    opset = default_opset(dtype, DEFAULT_OPSET) if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise EdgeAttnError(f"opset must be an integer in [{OPSETS[0]}, {OPSETS[-1]}], got {opset!r}")
    check_opset(dtype, opset)
    targets = _targets(runtimes, precision)
    _check_lowering(lowering, opset, targets)
    return ExportRequest(precision, dtype, quantize, opset, lowering, tuple(targets), inline, dynamic_batch)


def _targets(names, precision: str) -> list[str]:
    """The ONNX runtimes named (the reference checks files but is no target), or all of them by default; named
    ones that cannot run ``precision`` are an error, defaults that cannot are dropped."""
    names = [names] if isinstance(names, str) else names
    if names is not None and (not names or any(n not in runtimes.RUNTIMES for n in names)):
        raise EdgeAttnError(f"target runtimes must be among {', '.join(runtimes.ONNX_RUNTIMES)}, got {list(names)}")
    named = [n for n in dict.fromkeys(names or ()) if not runtimes.get(n).reference]
    contents = Contents(precision)
    refused = {n: reasons for n in named or runtimes.ONNX_RUNTIMES
               if (reasons := runtimes.get(n).not_supported_reasons(contents, here=False))}
    if refused and named:
        name, reasons = next(iter(refused.items()))
        raise EdgeAttnError(f"{name} cannot run {precision} files: {reasons[0]}")
    return [n for n in named or runtimes.ONNX_RUNTIMES if n not in refused]


def _check_lowering(lowering: str, opset: int, targets: Sequence[str]) -> None:
    """Refuse a lowering the opset or a target runtime cannot run, saying what to change."""
    if lowering not in LOWERING_CHOICES:
        raise EdgeAttnError(f"unknown lowering {lowering!r}; choose one of: {', '.join(LOWERING_CHOICES)}")
    if lowering == "auto":
        return
    low = LOWERINGS[lowering]
    if opset < low.min_opset:
        raise EdgeAttnError(f"the {lowering} lowering needs opset >= {low.min_opset} (the ONNX Attention op), "
                            f"got opset {opset}; pass --opset {low.min_opset} or another lowering")
    contents = Contents(lowerings=frozenset({lowering}))
    unsupported = [t for t in targets if runtimes.get(t).not_supported_reasons(contents, here=False)]
    if unsupported:
        runs = [n for n in runtimes.ONNX_RUNTIMES if not runtimes.get(n).not_supported_reasons(contents, here=False)]
        raise EdgeAttnError(f"the {lowering} lowering runs on {', '.join(runs)} only, not on "
                            f"{', '.join(unsupported)}; use --lowering auto, dense or blocked for those runtimes")
