"""The registered-model workflow behind ``edgeattn export``: build a reference model, export it, optionally check
it on runtimes against the model just built, in one call (what the CLI calls)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import models, onnxfile, parity
from .export import precision
from .export.exporter import ExportResult, export_checked
from .export.request import check_request
from .files import check_writable


def export_registered(
    name: str,
    path,
    *,
    seed: int = 0,
    opset: Optional[int] = None,
    custom_op: bool = False,
    lowering: str = "auto",
    runtimes: Optional[Sequence[str]] = None,
    dynamic_batch: bool = False,
    dtype: str = "fp32",
    quantize: Optional[str] = None,
    calibration=None,
    calibration_samples: int = precision.DEFAULT_CALIBRATION_SAMPLES,
    check: bool = False,
    runs: int = 20,
    report=None,
    progress: Optional[Callable[[str], None]] = None,
    format: Optional[str] = None,
    **config,
) -> ExportResult:
    """Build a registered reference model and export it; the metadata lets `edgeattn check` rebuild the reference.

    ``runtimes`` name the ONNX runtimes the file is for (default: all) and, with ``check=True``, the runtimes the
    parity gate runs on (``torch``, the reference, may be among them; default: torch and every available target).
    The check compares with the model just built and writes its results to ``report`` (a JSON path) when given:
    ``result.parity``.  ``calibration`` (int8-static) is an ``.npz`` path (see
    :func:`precision.load_calibration`) or a list of feeds; by default ``calibration_samples`` inputs are drawn like
    the model's example inputs, with other seeds.  Everything is validated before the model is built."""
    request = check_request(
        dtype=dtype,
        quantize=quantize,
        opset=opset,
        lowering=lowering,
        runtimes=runtimes,
        custom_op=custom_op,
        dynamic_batch=dynamic_batch,
        path=path,
        format=format,
    )
    if report is not None:
        check_writable(report)
    check_on = parity.check_available(runtimes) if check and runtimes else None
    built = models.build(name, seed=seed, **config)  # a user's model (module:callable) is converted here
    if request.quantize == "int8-static":
        if isinstance(calibration, (str, Path)):
            calibration = precision.load_calibration(calibration, list(built.inputs))
        elif calibration is None:
            calibration = calibration_feeds(built, calibration_samples)
    if progress:
        progress(
            f"exporting {name} -> {path} (opset {request.opset}, lowering {lowering}, {dtype}"
            f"{', ' + quantize if quantize else ''}{', custom op' if custom_op else ''}, {request.format})"
        )
    result = export_checked(
        built.exported,
        list(built.inputs.values()),
        path,
        request,
        batch_axes=[built.batch_axes.get(k, 0) for k in built.inputs] if dynamic_batch else None,
        input_names=list(built.inputs),
        output_names=list(built.outputs) or None,
        metadata_props={"model": name, "config": built.config, "seed": seed},
        calibration=calibration,
    )
    if progress:
        progress(_summary(result))
    if check:
        result.parity = parity.compare_model(
            built.module,
            list(built.inputs.values()),
            result.path,
            check_on,
            runs,
            progress=lambda n: progress(f"checking on {n} ...") if progress else None,
        )
        if report is not None:
            parity.write_json(result.parity, report)
    return result


def calibration_feeds(built, count: int = precision.DEFAULT_CALIBRATION_SAMPLES) -> list[dict]:
    """int8-static calibration feeds for a registered model: its example inputs drawn with the next seeds."""

    def draw(seed):
        if models.user.is_spec(built.name):
            return models.user.example_inputs(built.config["inputs"], seed)
        return models.example_inputs(built.name, seed, **built.config)

    return [{k: v.numpy() for k, v in draw(built.seed + 1 + i).items()} for i in range(count)]


def _summary(result: ExportResult) -> str:
    counts = Counter(f"{onnxfile.mask_label(m)} ({m['lowering']})" for m in result.masks)
    return (
        f"wrote {result.path}: {result.file_bytes / 1e6:.1f} MB, {len(result.masks)} attention nodes "
        f"({', '.join(f'{k} x{v}' for k, v in counts.items())}), mask tables {result.table_bytes / 1e6:.1f} MB"
    )
