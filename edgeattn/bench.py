"""``edgeattn bench``: export a model with each lowering, in both forms, and time it on each runtime, in one table.

The forms: ``standard`` (the default export: standard ops only, what any runtime or converter reads) and
``custom-op`` (``--custom-op``: edgeattn nodes with function bodies, which edgeattn's runtimes swap for their fastest
kernel), side by side so the cost of portability is a number.

Rows look like ``yolo benchmark``'s: runtime, lowering, precision, status, file size, accuracy against eager fp32
PyTorch, median and p90 latency, and the speedup over eager PyTorch (the first row).  Runtimes load files as a
deployment would (OpenVINO runs fp16/bf16 files at that precision where the CPU supports it), and each row is gated
on the runtime's tolerance for its precision.  A file argument benchmarks that file as is.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import models, onnxfile, parity, plots, runtimes
from .errors import InvalidArgument, NoSuchLowering, first_line
from .export import DEFAULT_OPSET, LOWERING_CHOICES, export_onnx
from .export.precision import DTYPES, PRECISIONS, QUANTIZE, default_opset
from .files import atomic_write, check_writable
from .onnxfile import formats
from .registered import calibration_feeds

# the opset each lowering is exported at when benchmarking a model (attention needs the Attention op)
BENCH_OPSET = {"attention": 23}
FORMS = ("standard", "custom-op")


@dataclass
class BenchRow:
    runtime: str
    lowering: str
    status: str
    form: str = "standard"  # standard, custom-op, or the format of a given .xml / .ort file
    precision: str = "fp32"
    file_mb: Optional[float] = None
    max_abs_err: Optional[float] = None
    cosine: Optional[float] = None
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    speedup: Optional[float] = None  # eager torch p50 / this p50
    opset: Optional[int] = None
    detail: str = ""
    tables_mb: Optional[float] = None  # unique mask-table bytes in the file
    export_s: Optional[float] = None  # how long the export took (None for a given file)


def run(
    target: str,
    runtime_names: Optional[Sequence[str]] = None,
    lowerings: Optional[Sequence[str]] = None,
    runs: int = 20,
    seed: int = 0,
    progress: Optional[Callable[[int, int, str], None]] = None,
    precisions: Optional[Sequence[str]] = None,
    forms: Optional[Sequence[str]] = None,
    inputs: Optional[dict[str, str]] = None,
    trust_code: bool = False,
    source=None,
) -> list[BenchRow]:
    """Benchmark a registered model or an exported file (.onnx, .xml, .ort: as is) on each runtime that loads it.

    A model is exported with each of ``lowerings`` in each of ``precisions`` and ``forms`` (default: every lowering
    in fp32, both forms; with precisions named, the auto lowering in each).  A user's model ``module:callable``
    takes ``inputs`` ({name: "SHAPE[:DTYPE]"}); a file exported from one is rebuilt only with ``trust_code``.
    ``source``: the edgeattn file a given file was converted from (a .tflite from onnx2tf), for its metadata."""
    names = [n for n in (runtime_names or runtimes.available()) if not runtimes.get(n).reference]
    reference = [n for n, r in runtimes.RUNTIMES.items() if r.reference]
    is_file = target not in models.REGISTRY and not models.user.is_spec(target)
    if is_file and not Path(target).exists():
        raise InvalidArgument(f"{target!r} is neither a registered model ({', '.join(models.names())}) nor a file")
    if is_file and (lowerings or precisions or forms):
        raise InvalidArgument(
            "--lowering, --precision and --form apply when benchmarking a model; a file is timed as exported"
        )
    unknown = [p for p in precisions or () if p not in PRECISIONS] + [f for f in forms or () if f not in FORMS]
    if unknown:
        raise InvalidArgument(
            f"unknown precision or form {unknown[0]!r}; choose from: {', '.join(PRECISIONS)} / {', '.join(FORMS)}"
        )
    every_lowering = not is_file and not lowerings and not precisions  # the default list, not asked for by name
    with tempfile.TemporaryDirectory(prefix="edgeattn-bench-") as tmp:
        given = None  # a given file's header is read once, here; a model's files are exported below
        if is_file:  # (lowering, precision, opset, form, file)
            given = formats.header(target)
            given = formats.converted_from(given, source) if source is not None else given
            built, meta = models.from_metadata(given.metadata, target, trust_code), given.metadata
            if not runtime_names:  # by default, the runtimes that load the file's format
                names = runtimes.available(given.format)
            plan = [
                (
                    meta.get("lowering", "?"),
                    meta.get("precision", "fp32"),
                    int(meta.get("opset", 0)),
                    formats.form_of(meta),
                    Path(target),
                )
            ]
        else:
            built = models.build(target, seed=seed, **({"inputs": inputs} if inputs else {}))
            lowerings = lowerings or (["auto"] if precisions else LOWERING_CHOICES)
            plan = [
                (low, prec, default_opset(prec, BENCH_OPSET.get(low, DEFAULT_OPSET)), form, None)
                for prec in precisions or ["fp32"]
                for low in lowerings
                for form in forms or FORMS
            ]
        inputs = list(built.inputs.values())
        step = _stepper(progress, len(reference) + len(plan) * len(names))
        rows, eager_ms, eager_timed = [], None, False
        for lowering, precision, opset, form, path in plan:
            export_s = None
            if path is None:
                path = Path(tmp) / f"model-{lowering}-{precision}-{form}.onnx"
                step(f"exporting {lowering} {precision} {form}", advance=False)
                start = time.perf_counter()
                try:
                    export_onnx(
                        built.exported,
                        inputs,
                        path,
                        opset=opset,
                        lowering=lowering,
                        runtimes=_targets(lowering),
                        input_names=list(built.inputs),
                        output_names=list(built.outputs) or None,
                        metadata_props={"model": built.name, "config": built.config, "seed": built.seed},
                        dtype=precision if precision in DTYPES else "fp32",
                        quantize=precision if precision in QUANTIZE else None,
                        calibration=calibration_feeds(built) if precision == "int8-static" else None,
                        custom_op=form == "custom-op",
                    )
                except NoSuchLowering as e:  # e.g. routed attention has no `attention` body
                    if not every_lowering:  # asked for by name: say why not
                        raise
                    for n in names:
                        step(f"{n} {lowering}: n/a")
                        rows.append(BenchRow(n, lowering, "n/a", form, precision, opset=opset, detail=first_line(e)))
                    continue
                export_s = time.perf_counter() - start
            file = given or formats.header(path)
            meta = file.metadata
            label, tables_mb = _label(lowering, meta), meta.get("table_bytes", 0) / 1e6
            feeds, outputs = parity.reference_outputs(built.module, inputs, path, file)
            # the reference (eager torch) is timed once, with the first file, before the runtimes
            timed = names if eager_timed else reference + names
            eager_timed = True
            results = parity.check_sessions(
                outputs,
                feeds,
                path,
                timed,
                runs,
                accuracy=False,
                module=built.module,
                contents=onnxfile.Contents.of(meta),
                progress=lambda n: step(f"{n} {label}" if n in names else "torch eager"),
            )
            for r in results:
                if runtimes.get(r.runtime).reference:
                    eager_ms = r.p50_ms
                    rows.append(
                        BenchRow(
                            r.runtime,
                            "eager",
                            r.status,
                            "-",
                            "fp32",
                            None,
                            r.max_abs_err,
                            r.cosine,
                            r.p50_ms,
                            r.p90_ms,
                            1.0,
                        )
                    )
                elif r.status == "unavailable":  # the runtime cannot run this lowering, precision or format
                    rows.append(BenchRow(r.runtime, label, "n/a", form, precision, opset=opset, detail=r.detail))
                else:
                    rows.append(
                        BenchRow(
                            r.runtime,
                            label,
                            r.status,
                            form,
                            precision,
                            _size_mb(path),
                            r.max_abs_err,
                            r.cosine,
                            r.p50_ms,
                            r.p90_ms,
                            eager_ms / r.p50_ms if eager_ms and r.p50_ms else None,
                            opset,
                            r.detail,
                            tables_mb,
                            export_s,
                        )
                    )
    return rows


def _targets(lowering: str) -> Optional[list[str]]:
    """The runtimes a lowering is exported for: those that run it (contrib: onnxruntime), None when all do."""
    if lowering not in onnxfile.LOWERINGS:
        return None
    contents = onnxfile.Contents(lowerings=frozenset({lowering}))
    able = [n for n in runtimes.ONNX_RUNTIMES if not runtimes.get(n).not_supported_reasons(contents, here=False)]
    return None if len(able) == len(runtimes.ONNX_RUNTIMES) else able


def _size_mb(path: Path) -> float:
    """The file's size with its weights (an IR's .bin, ONNX external data beside it)."""
    data = [path.with_suffix(".bin")] if path.suffix == ".xml" else [path.with_name(path.name + ".data")]
    return sum(p.stat().st_size for p in [path, *data] if p.is_file()) / 1e6


def _label(lowering: str, meta: dict) -> str:
    """``auto`` shows what it chose (from the file's metadata): ``auto:blocked``; so does a lowering some node has
    another body for (``dense:routed_dense``: routed attention's dense lowering)."""
    chosen = sorted({m["lowering"] for m in meta.get("masks", [])})
    if lowering != "auto" and chosen in ([], [lowering]):
        return lowering
    return f"{lowering}:{'/'.join(chosen)}"


def _stepper(progress, total):
    done = [0]

    def step(label: str, advance: bool = True):
        if advance:
            done[0] += 1
        if progress:
            progress(done[0], total, label)

    return step


HEADER = (
    "runtime",
    "lowering",
    "form",
    "precision",
    "status",
    "size_MB",
    "tables_MB",
    "export_s",
    "max_abs_err",
    "cosine",
    "p50_ms",
    "p90_ms",
    "speedup",
)


def _cells(r: BenchRow) -> tuple[str, ...]:
    def num(v, fmt):
        return "-" if v is None else fmt.format(v)

    return (
        r.runtime,
        r.lowering,
        r.form,
        r.precision,
        r.status,
        num(r.file_mb, "{:.2f}"),
        num(r.tables_mb, "{:.2f}"),
        num(r.export_s, "{:.1f}"),
        num(r.max_abs_err, "{:.2e}"),
        num(r.cosine, "{:.6f}"),
        num(r.p50_ms, "{:.2f}"),
        num(r.p90_ms, "{:.2f}"),
        num(r.speedup, "{:.1f}x"),
    )


def format_table(rows: Sequence[BenchRow]) -> str:
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(
        lines
        + [
            f"  {r.runtime} {r.lowering} {r.form}: {r.detail}"
            for r in rows
            if r.detail and r.status not in ("ok", "n/a")
        ]
    )


def format_markdown(rows: Sequence[BenchRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows]) + "\n"


def write_json(rows: Sequence[BenchRow], path) -> None:
    atomic_write(path, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())


def write_markdown(rows: Sequence[BenchRow], path) -> None:
    atomic_write(path, format_markdown(rows).encode())


def progress_bar(width: int = 24):
    """A one-line progress bar on stderr when it is a terminal (one line per step otherwise, so logs stay readable)."""

    def show(done: int, total: int, label: str):
        stream = sys.stderr
        filled = width * done // max(total, 1)
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"
        if stream.isatty():
            stream.write("\r" + text.ljust(80) + ("\n" if done == total else ""))
        else:
            stream.write(text + "\n")
        stream.flush()

    return show


def check_outputs(json_path=None, markdown_path=None, plot_path=None) -> None:
    """Fail before a long run, not after it: every output path must be writable (and --plot's library present)."""
    for p in (json_path, markdown_path, plot_path):
        if p:
            check_writable(p)
    if plot_path:
        plots.require_matplotlib("--plot")
