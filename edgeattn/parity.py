"""Accuracy and latency of runtimes against the PyTorch reference: the gate behind ``--check`` and ``edgeattn check``.

Metrics per output, worst over outputs: max |out - ref|; the same relative to the largest |ref| (``max_rel_err``);
cosine similarity of the flattened tensors.  A runtime passes when no output has NaN/inf that the reference lacks and
the metrics are within the runtime's tolerance for the file's precision (``Tolerance``: abs or rel bound, cosine).
Reduced-precision files (fp16, bf16, int8) are compared with the fp32 PyTorch model they were exported from, with
runtimes in accuracy mode.

A model with hard decisions (a threshold, :mod:`edgeattn.decisions`) can land on the other side of one on a runtime
when the compared value is within rounding of the threshold, and its outputs then differ by far more than rounding.
A failed comparison of such a file is re-judged modulo those ties: the reference takes the runtime's decision where
the margin is below the tolerance's ``decision_eps`` and the row reports how many decisions flipped and the error
that remains; a flip at a larger margin fails.  Tolerances are not loosened.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from . import decisions, models, onnxfile, runtimes
from .errors import BadFile, EdgeAttnError, InvalidArgument, first_line
from .files import atomic_write, check_writable
from .onnxfile import formats
from .runtimes.base import check_feeds, nonfinite_inputs
from .runtimes.openvino import plain_compile_note
from .runtimes.reference import TorchSession


@dataclass
class ParityResult:
    runtime: str
    status: str  # ok | fail | unavailable | error
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    cosine: Optional[float] = None
    tolerance: str = ""
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compare(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict:
    """Worst-case error metrics over the reference's outputs."""
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "cosine": 1.0, "nonfinite": False}
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(outputs[name], dtype=np.float64)
        if out.shape != ref.shape:
            raise EdgeAttnError(f"output {name!r}: runtime gave shape {out.shape}, reference {ref.shape}")
        if np.array_equal(out, ref, equal_nan=True):  # bit-identical (the reference itself): exact, whatever NaN
            continue
        finite = np.isfinite(ref)
        if (np.isfinite(out) != finite).any() or (out[~finite] != ref[~finite]).any():
            worst["nonfinite"] = True  # NaN/inf in one and not the other (equal infs are fine)
        out, ref = np.where(finite, out, 0.0), np.where(finite, ref, 0.0)
        err = float(np.abs(out - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        norms = np.linalg.norm(out) * np.linalg.norm(ref)
        cosine = float((out.ravel() @ ref.ravel()) / norms) if norms > 0 else float(np.array_equal(out, ref))
        worst["max_abs_err"] = max(worst["max_abs_err"], err)
        worst["max_rel_err"] = max(worst["max_rel_err"], err / scale if scale > 0 else err)
        worst["cosine"] = min(worst["cosine"], cosine)
    return worst


def latency(run: Callable[[], object], warmup: Optional[int] = None, runs: int = 20) -> tuple[float, float]:
    """Median and 90th-percentile wall time in ms of ``run()`` after ``warmup`` calls (default: as many as the
    timed runs, at most 3: a one-run check warms up once)."""
    for _ in range(min(3, max(1, runs)) if warmup is None else warmup):
        run()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def check_sessions(
    reference: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    path,
    runtime_names: Sequence[str],
    runs: int = 20,
    precision: str = "fp32",
    progress: Optional[Callable[[str], None]] = None,
    accuracy: bool = True,
    module: Optional[torch.nn.Module] = None,
    contents: Optional[onnxfile.Contents] = None,
) -> list[ParityResult]:
    """Load ``path`` on each runtime, compare with ``reference`` and time it.  Never raises for one runtime.

    ``accuracy`` loads runtimes in accuracy mode (the parity gate); bench loads them as a deployment would.
    ``module`` is the torch module the file came from (what the reference runtime runs); ``contents`` what the file
    holds (default: its precision), which a runtime may refuse.  Reference runtimes are timed first: idle runtime
    thread pools left spinning would slow eager torch down."""
    contents = contents or onnxfile.Contents(precision)
    results = []
    for name in sorted(runtime_names, key=lambda n: not runtimes.get(n).reference):
        runtime = runtimes.get(name)
        if progress:
            progress(name)
        reasons = runtime.not_supported_reasons(contents)
        if reasons:
            results.append(ParityResult(name, "unavailable", detail="; ".join(reasons)))
            continue
        try:
            tol = runtime.tolerance(contents.precision)
            session = runtime.load(path, accuracy=accuracy, module=module)
            metrics = compare(reference, session.run(feeds))
            p50, p90 = latency(lambda: session.run(feeds), runs=runs)
            fused = getattr(session, "fused_kernel", 0)  # OpenVINO with edgeattn-kernels
            notes = [f"{fused} attention node(s) ran edgeattn-kernels' fused kernel"] if fused else []
            not_ties = 0
            if not passes(metrics, tol) and module is not None and not runtime.reference:
                del session
                metrics, tie_notes, not_ties = modulo_ties(runtime, path, feeds, module, tol, accuracy, metrics)
                notes += tie_notes
        except EdgeAttnError as e:
            results.append(ParityResult(name, "error", detail=str(e)))
            continue
        ok = passes(metrics, tol) and not not_ties
        notes += ["NaN/inf do not match the reference"] if metrics["nonfinite"] else []
        flagged = nonfinite_inputs(feeds)
        notes += [f"inputs with NaN/inf: {', '.join(flagged)}"] if flagged else []
        results.append(
            ParityResult(
                name,
                "ok" if ok else "fail",
                metrics["max_abs_err"],
                metrics["max_rel_err"],
                metrics["cosine"],
                tol.describe(),
                p50,
                p90,
                "; ".join(notes),
            )
        )
    return results


def passes(metrics: Mapping, tol) -> bool:
    return not metrics["nonfinite"] and tol.passes(metrics["max_abs_err"], metrics["max_rel_err"], metrics["cosine"])


def modulo_ties(runtime, path, feeds, module, tol, accuracy: bool, metrics: dict) -> tuple[dict, list[str], int]:
    """A failed comparison, re-judged where the file declares hard decisions (:mod:`edgeattn.decisions`): run the
    file again returning the compared tensors, re-run the reference taking the runtime's decision wherever they
    disagree within ``tol.decision_eps``, and compare with that.  Returns the metrics to judge, notes, and how many
    decisions flipped at a larger margin (any fails the check whatever the metrics).  Files without declared
    decisions keep ``metrics``."""
    file = formats.header(path)
    declared = file.metadata.get("decisions") or []
    if not declared:
        return metrics, [], 0
    try:
        session = runtime.load(path, accuracy=accuracy, module=module, observe=[d["tensor"] for d in declared])
        outputs = session.run(feeds)
    except EdgeAttnError as e:
        return (
            metrics,
            [
                f"the file declares {len(declared)} hard decisions, which {runtime.name} could not return "
                f"for a check modulo ties: {e}"
            ],
            0,
        )
    ledger = decisions.Ledger([outputs[d["tensor"]] for d in declared], tol.decision_eps)
    with ledger:
        reference = TorchSession("torch", module, file.inputs, file.outputs).run(feeds)
    retaken = compare(reference, outputs)
    notes = [
        f"{ledger.summary()}; with those taken from {runtime.name}, max abs err {retaken['max_abs_err']:.2e} "
        f"(without: {metrics['max_abs_err']:.2e})"
    ]
    if ledger.large:
        notes.append(f"not ties: {ledger.large} decisions differ at margins up to {ledger.largest_flip:.1e}")
    return retaken, notes, ledger.large


def check_file(
    path,
    runtime_names: Optional[Sequence[str]] = None,
    runs: int = 20,
    progress: Optional[Callable[[str], None]] = None,
    report=None,
    inputs=None,
    trust_code: bool = False,
    source=None,
) -> list[ParityResult]:
    """What ``edgeattn check`` runs.  A file from ``edgeattn export`` names its registered model in its metadata: the
    model is rebuilt and every runtime compared with it (the torch reference runtime's row times eager PyTorch; its
    error is 0 by construction).  Any other file (exported from Python, or from elsewhere) has no PyTorch model to
    rebuild, so its runtimes are compared with each other (:func:`compare_runtimes`); to compare it with the module
    it came from, call :func:`compare_model` from Python.  A file exported from a user's own model
    (``module:callable``) is compared with it only with ``trust_code=True`` (rebuilding it runs that code), with
    its runtimes otherwise.

    ``inputs``: an ``.npz`` path or a mapping of input name -> array, fed to every runtime (and the torch reference);
    default: the registered model's example inputs, or :func:`generated_feeds`.  ``report``: a JSON path for the
    results, checked before the work.  ``source``: the edgeattn file ``path`` was converted from (a TFLite model
    from onnx2tf), whose metadata stands for the file's own."""
    if report is not None:
        check_writable(report)
    file = formats.header(path)
    if source is not None:
        file = formats.converted_from(file, source)
    elif file.format == "tflite":
        raise InvalidArgument(
            f"{path}: a TFLite model carries no edgeattn metadata; name the .onnx file it was converted from: "
            f"edgeattn check {path} --source MODEL.onnx"
        )
    feeds = None if inputs is None else load_inputs(inputs, file)
    if "model" not in file.metadata or (models.user.is_spec(file.metadata["model"]) and not trust_code):
        results = compare_runtimes(path, feeds, runtime_names, runs, progress, file=file)
    else:
        built = models.from_metadata(file.metadata, path, trust_code)
        example = (
            list(built.inputs.values())
            if feeds is None
            else [torch.from_numpy(feeds[info.name]) for info in file.inputs]
        )
        results = compare_model(built.module, example, path, runtime_names, runs, progress, file=file)
    if report is not None:
        write_json(results, report)
    return results


# the tolerance column of the runtime the others are compared with, when a file has no PyTorch reference
REFERENCE = "reference"


def compare_runtimes(
    path,
    feeds: Optional[Mapping[str, np.ndarray]] = None,
    runtime_names: Optional[Sequence[str]] = None,
    runs: int = 20,
    progress: Optional[Callable[[str], None]] = None,
    file: Optional[formats.Header] = None,
) -> list[ParityResult]:
    """Compare a file's runtimes with each other, for a file with no PyTorch model: the first of them that runs it
    (ort-cpu when it is one) is the reference, and its row's tolerance reads ``reference``.  The others are gated on
    their own tolerance for the file's precision, applied to their difference from the reference (so this finds
    runtimes that disagree, not a file that is wrong everywhere).  ``runtime_names`` default to every available ONNX
    runtime that loads the file; ``feeds`` to :func:`generated_feeds`."""
    file = file or formats.header(path)
    meta = {**file.metadata, "format": file.format}  # a file from elsewhere carries no format metadata
    contents = onnxfile.Contents.of(meta)
    names = list(runtime_names or [n for n in default_runtimes(meta) if not runtimes.get(n).reference])
    torch_named = [n for n in names if runtimes.get(n).reference]
    if torch_named:
        raise EdgeAttnError(
            f"{path}: names no registered model in its metadata, so {torch_named[0]} has no model to "
            f"run; compare it with its module from Python: edgeattn.parity.compare_model(module, "
            f"inputs, path)"
        )
    able = [n for n in names if not runtimes.get(n).not_supported_reasons(contents)]
    if not able:
        raise EdgeAttnError(
            f"{path}: no runtime here runs it (tried {', '.join(names) or 'none'}), so there is nothing to compare"
        )
    reference = "ort-cpu" if "ort-cpu" in able else able[0]
    feeds = generated_feeds(file.inputs) if feeds is None else feeds
    expected = runtimes.get(reference).load(path, accuracy=True).run(feeds)
    results = check_sessions(
        expected,
        feeds,
        path,
        [reference] + [n for n in names if n != reference],
        runs,
        progress=progress,
        contents=contents,
    )
    for r in results:
        if r.runtime == reference:
            r.tolerance = REFERENCE
    return results


def generated_feeds(inputs: Sequence[onnxfile.TensorInfo], seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Feeds for a file with no model to draw example inputs from, from its inputs' names, shapes and dtypes:
    symbolic dimensions (a dynamic batch) are ``batch``; floats are standard normal; integers are 0..3 and bools
    either (valid token ids, indices and counts for most models), all from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in info.shape)
        values = (
            rng.standard_normal(shape)
            if np.issubdtype(info.dtype, np.floating)
            else rng.integers(0, 2 if info.dtype == np.bool_ else 4, shape)
        )
        feeds[info.name] = values.astype(info.dtype)
    return feeds


def load_inputs(inputs, file: formats.Header) -> dict[str, np.ndarray]:
    """Feeds for ``file`` from an ``.npz`` path (one array per input name: ``numpy.savez(path, x=...)``) or a mapping,
    checked against the file's inputs by name, dtype and static dimensions (one clear error)."""
    source = "inputs"
    if not isinstance(inputs, Mapping):
        source = inputs
        save = f"save them with numpy.savez(path, {', '.join(f'{i.name}=...' for i in file.inputs)})"
        if not Path(inputs).is_file():
            raise EdgeAttnError(f"{inputs}: no such file")
        if not zipfile.is_zipfile(inputs):  # numpy would try it as a pickle and say so
            raise EdgeAttnError(f"{inputs}: not an .npz archive; {save}")
        try:
            with np.load(inputs, allow_pickle=False) as data:
                inputs = {name: data[name] for name in data.files}
        except Exception as e:
            raise BadFile(f"{source}: cannot read inputs ({first_line(e)}); {save}") from None
    try:
        return check_feeds(file.inputs, inputs)
    except EdgeAttnError as e:
        raise type(e)(f"{source}: {e}") from None


def compare_model(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path,
    runtime_names: Optional[Sequence[str]] = None,
    runs: int = 20,
    progress: Optional[Callable[[str], None]] = None,
    file: Optional[formats.Header] = None,
    accuracy: bool = True,
) -> list[ParityResult]:
    """Compare an exported file (.onnx, .xml or .ort) with the module it came from, on the given inputs (Python API
    for any model).  ``runtime_names`` default to :func:`default_runtimes`; ``file``: its header, if already
    read; ``accuracy=False`` loads the runtimes as a deployment would (see :func:`check_sessions`)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    file = file or formats.header(path)
    meta = file.metadata
    feeds, reference = reference_outputs(module, example_inputs, path, file)
    names = list(runtime_names) if runtime_names else default_runtimes(meta)
    return check_sessions(
        reference,
        feeds,
        path,
        names,
        runs,
        progress=progress,
        accuracy=accuracy,
        module=module,
        contents=onnxfile.Contents.of(meta),
    )


def reference_outputs(
    module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path, file: Optional[formats.Header] = None
):
    """The file's feeds for ``example_inputs`` and eager torch's outputs under the file's output names
    (``file``: its header, if already read)."""
    file = file or formats.header(path)
    if len(file.inputs) != len(example_inputs):
        raise EdgeAttnError(f"{path} has {len(file.inputs)} inputs, {len(example_inputs)} example inputs given")
    feeds = {info.name: t.detach().cpu().numpy() for info, t in zip(file.inputs, example_inputs)}
    return feeds, TorchSession("torch", module, file.inputs, file.outputs).run(feeds)


def default_runtimes(metadata: Optional[Mapping] = None) -> list[str]:
    """What a check covers when no runtime is named: the reference and every available ONNX runtime the file was
    exported for (its ``targets`` metadata: a contrib-lowered file is for onnxruntime only)."""
    targets = (metadata or {}).get("targets")
    reference = [n for n, r in runtimes.RUNTIMES.items() if r.reference]
    format = (metadata or {}).get("format", "onnx")
    return reference + [n for n in runtimes.available(format) if not targets or n in targets]


def check_available(names: Sequence[str]) -> list[str]:
    """Runtimes named explicitly must all run here: one error before any work, not a row after it."""
    for name in names:
        reasons = runtimes.get(name).machine_reasons()
        if reasons:
            raise EdgeAttnError(f"runtime {name} is not available: {'; '.join(reasons)}")
    return list(dict.fromkeys(runtimes.get(n).name for n in names))  # ort:CPU is ort-cpu: one row


def describe(path, meta: Optional[Mapping] = None) -> str:
    """About an exported file, from its metadata (``meta``: already read): one line, then one line per distinct
    (mask, lowering)."""
    meta = formats.header(path).metadata if meta is None else meta
    nodes = meta.get("masks", [])
    lowerings = sorted({m.get("lowering", "?") for m in nodes})
    targets = meta.get("targets")
    lines = [
        f"{path}: model {meta.get('model', '(not a registered model)')}, opset {meta.get('opset', '?')}, "
        f"{len(nodes)} attention nodes, lowering {meta.get('lowering', '?')} -> {'/'.join(lowerings) or '-'}"
        f"{_form(meta)}"
        f"{' for ' + ', '.join(targets) if targets else ''}, mask tables {meta.get('table_bytes', 0) / 1e6:.2f} MB"
    ]
    return "\n".join(lines + onnxfile.attention_lines(nodes))


def describe_check(path, results: Sequence[ParityResult], source=None) -> str:
    """:func:`describe`; for a file without a PyTorch reference, which runtime the others were compared with; and
    when OpenVINO ran it, what a plain OpenVINO compile computes it in here if that is below the file's precision
    (``source``: the file ``path`` was converted from, as given to :func:`check_file`)."""
    meta = (formats.converted_from(formats.header(path), source) if source else formats.header(path)).metadata
    lines = [describe(path, meta)]
    reference = next((r.runtime for r in results if r.tolerance == REFERENCE), None)
    if reference is not None and len(results) > 1:
        lines.append(f"no PyTorch reference: runtimes compared with {reference}")
    elif reference is not None:  # one runtime (an IR: OpenVINO only) ran it and was compared with nothing
        lines.append(f"no PyTorch reference and no other runtime to compare with: {reference} only ran it")
    if any(r.runtime.startswith("openvino") and r.status in ("ok", "fail") for r in results):
        note = plain_compile_note(meta.get("precision", "fp32"))
        lines += [f"OpenVINO: {note}"] if note else []
    return "\n".join(lines)


def _form(meta: Mapping) -> str:
    """How the attention is stored: standard ops (the default), custom op, or a deployment format (and an IR's
    fp16-compressed weights)."""
    form = formats.form_of(meta)
    weights = (
        ", fp16 weights: ovc compresses them by default, --compress_to_fp16=False keeps fp32"
        if meta.get("weights") == "fp16"
        else ""
    )
    return f" ({ {'standard': 'standard ops', 'custom-op': 'custom op'}.get(form, form + ' format') }{weights})"


def format_table(results: Sequence[ParityResult]) -> str:
    """A plain-text table: one row per runtime."""
    header = ("runtime", "status", "max_abs_err", "max_rel_err", "cosine", "tolerance", "p50_ms", "p90_ms")
    rows = [header]
    for r in results:
        rows.append(
            (
                r.runtime,
                r.status,
                _num(r.max_abs_err, "{:.2e}"),
                _num(r.max_rel_err, "{:.2e}"),
                _num(r.cosine, "{:.7f}"),
                r.tolerance or "-",
                _num(r.p50_ms, "{:.2f}"),
                _num(r.p90_ms, "{:.2f}"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    notes = [f"  {r.runtime}: {r.detail}" for r in results if r.detail]
    return "\n".join(lines + notes)


def _num(value, fmt):
    return "-" if value is None else fmt.format(value)


def write_json(results: Sequence[ParityResult], path) -> None:
    text = json.dumps([r.as_dict() for r in results], indent=2) + "\n"
    atomic_write(path, text.encode())
