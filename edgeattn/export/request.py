"""What an export is asked to write, validated once before any work: precision, opset, lowering, target runtimes.

The runtimes answer for themselves (:meth:`Runtime.not_supported_reasons` with ``here=False``: an export may target
a runtime this machine lacks); this module only turns their answers into one error that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .. import runtimes
from ..errors import EdgeAttnError, InvalidArgument
from ..files import check_writable
from ..onnxfile import LOWERINGS, Contents, formats
from .precision import check_opset, default_opset, precision_name
from .repository import check_folder

DEFAULT_OPSET = 18
OPSETS = range(17, 26)  # the opsets exported and run on onnxruntime and OpenVINO here
# what --lowering takes: a routed node gets routed for auto and blocked, routed_dense for dense (export.plan)
LOWERING_CHOICES = ("auto", *(name for name, low in LOWERINGS.items() if low.layout != "routed"))


@dataclass(frozen=True)
class ExportRequest:
    precision: str  # fp32, fp16, bf16, int8 or int8-static
    dtype: str  # the compute dtype (fp32 for quantized files)
    quantize: Optional[str]
    opset: int
    lowering: str  # requested: auto or one of LOWERINGS
    targets: tuple[str, ...]  # the ONNX runtimes the file is for
    custom_op: bool = False  # keep edgeattn-domain attention nodes (default: their standard-op bodies inlined)
    dynamic_batch: bool = False
    format: str = "onnx"  # onnx, openvino (IR) or ort (see edgeattn.export.writers)
    repository: Optional[str] = None  # triton or ovms: a server repository folder holding the file


def check_request(
    *,
    dtype: str = "fp32",
    quantize: Optional[str] = None,
    opset: Optional[int] = None,
    lowering: str = "auto",
    runtimes: Optional[Sequence[str]] = None,
    custom_op: bool = False,
    dynamic_batch: bool = False,
    path=None,
    format: Optional[str] = None,
) -> ExportRequest:
    """Validate an export request; the opset defaults for the dtype, the targets to every runtime of the format
    that can run the precision (named targets that cannot are an error).  ``runtimes`` may name the torch
    reference, which checks files but is no target.  ``path``, when given, must be writable and its suffix must
    match ``format`` (which defaults to the suffix's); a repository format (triton, ovms) takes a folder and holds
    OpenVINO IR for ovms, and for triton when ``runtimes`` is only openvino-cpu (ONNX otherwise)."""
    repository = format if format in formats.REPOSITORIES else None
    if repository:
        if path is not None:
            check_folder(path, repository)
        only_openvino = list([runtimes] if isinstance(runtimes, str) else runtimes or []) == ["openvino-cpu"]
        format = "openvino" if repository == "ovms" or only_openvino else "onnx"
    else:
        format = _check_format(format, path)
        if path is not None:
            check_writable(path)
    if format == "openvino":
        custom_op = True  # the IR is built from the custom-op form: dense-table nodes become OpenVINO's SDPA
    precision = precision_name(dtype, quantize)
    opset = default_opset(dtype, DEFAULT_OPSET) if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise InvalidArgument(f"opset must be an integer in [{OPSETS[0]}, {OPSETS[-1]}], got {opset!r}")
    check_opset(dtype, opset)
    targets = _targets(runtimes, precision, format)
    _check_lowering(lowering, opset, targets)
    return ExportRequest(
        precision, dtype, quantize, opset, lowering, tuple(targets), custom_op, dynamic_batch, format, repository
    )


def _check_format(format: Optional[str], path) -> str:
    suffix = Path(path).suffix.lower() if path is not None else None
    if format is None:
        return formats.format_of(path) if path is not None else "onnx"
    if format not in formats.FORMATS:
        raise InvalidArgument(
            f"unknown format {format!r}; choose one of: {', '.join([*formats.FORMATS, *formats.REPOSITORIES])}"
        )
    if suffix is not None and suffix != formats.FORMATS[format]:
        raise InvalidArgument(
            f"{path}: a {format} file needs the suffix {formats.FORMATS[format]} (got "
            f"{suffix or 'none'}); name the output like model{formats.FORMATS[format]}"
        )
    return format


def _targets(names, precision: str, format: str) -> list[str]:
    """The runtimes named (the reference checks files but is no target), or by default all that load ``format``;
    named ones that cannot run ``precision`` are an error, defaults that cannot are dropped."""
    able = [n for n in runtimes.ONNX_RUNTIMES if format in runtimes.get(n).file_formats]
    names = [names] if isinstance(names, str) else names
    if names is not None and (not names or any(n not in runtimes.RUNTIMES for n in names)):
        raise InvalidArgument(f"target runtimes must be among {', '.join(able)}, got {list(names)}")
    named = [n for n in dict.fromkeys(names or ()) if not runtimes.get(n).reference]
    if any(n not in able for n in named):
        raise InvalidArgument(
            f"this format runs on {', '.join(able)} only, not on {', '.join(n for n in named if n not in able)}"
        )
    contents = Contents(precision)
    refused = {
        n: reasons for n in named or able if (reasons := runtimes.get(n).not_supported_reasons(contents, here=False))
    }
    if refused and named:
        name, reasons = next(iter(refused.items()))
        raise EdgeAttnError(f"{name} cannot run {precision} files: {reasons[0]}")
    return [n for n in named or able if n not in refused]


def _check_lowering(lowering: str, opset: int, targets: Sequence[str]) -> None:
    """Refuse a lowering the opset or a target runtime cannot run, saying what to change."""
    if lowering not in LOWERING_CHOICES:
        raise InvalidArgument(f"unknown lowering {lowering!r}; choose one of: {', '.join(LOWERING_CHOICES)}")
    if lowering == "auto":
        return
    low = LOWERINGS[lowering]
    if opset < low.min_opset:
        raise InvalidArgument(
            f"the {lowering} lowering needs opset >= {low.min_opset} (the ONNX Attention op), "
            f"got opset {opset}; pass --opset {low.min_opset} or another lowering"
        )
    contents = Contents(lowerings=frozenset({lowering}))
    unsupported = [t for t in targets if runtimes.get(t).not_supported_reasons(contents, here=False)]
    if unsupported:
        runs = [n for n in runtimes.ONNX_RUNTIMES if not runtimes.get(n).not_supported_reasons(contents, here=False)]
        raise InvalidArgument(
            f"the {lowering} lowering runs on {', '.join(runs)} only, not on "
            f"{', '.join(unsupported)}; use --lowering auto, dense or blocked for those runtimes"
        )
