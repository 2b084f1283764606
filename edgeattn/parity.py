"""Accuracy and latency of runtimes against the PyTorch reference: the gate behind ``--check`` and ``edgeattn check``.

Metrics per output, worst over outputs: max |out - ref|; the same relative to the largest |ref| (``max_rel_err``);
cosine similarity of the flattened tensors.  A runtime passes when no output has NaN/inf that the reference lacks and
the metrics are within the runtime's tolerance for the file's precision (``Tolerance``: abs or rel bound, cosine).
Reduced-precision files (fp16, bf16, int8) are compared with the fp32 PyTorch model they were exported from, with
runtimes in accuracy mode.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from . import onnxfile, runtimes
from .onnxfile import formats
from .errors import EdgeAttnError
from .files import atomic_write, check_writable
from .runtimes.base import nonfinite_inputs
from .runtimes.reference import TorchSession


@dataclass
class ParityResult:
    runtime: str
    status: str                      # ok | fail | unavailable | error
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
        if np.array_equal(out, ref, equal_nan=True):   # bit-identical (the reference itself): exact, whatever NaN
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


def latency(run: Callable[[], object], warmup: int = 3, runs: int = 20) -> tuple[float, float]:
    """Median and 90th-percentile wall time in ms of ``run()`` after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def check_sessions(reference: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray], path,
                   runtime_names: Sequence[str], runs: int = 20, precision: str = "fp32",
                   progress: Optional[Callable[[str], None]] = None, accuracy: bool = True,
                   module: Optional[torch.nn.Module] = None, contents: Optional[onnxfile.Contents] = None
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
        except EdgeAttnError as e:
            results.append(ParityResult(name, "error", detail=str(e)))
            continue
        ok = not metrics["nonfinite"] and tol.passes(metrics["max_abs_err"], metrics["max_rel_err"], metrics["cosine"])
        notes = ["NaN/inf do not match the reference"] if metrics["nonfinite"] else []
        flagged = nonfinite_inputs(feeds)
        notes += [f"inputs with NaN/inf: {', '.join(flagged)}"] if flagged else []
        results.append(ParityResult(name, "ok" if ok else "fail", metrics["max_abs_err"], metrics["max_rel_err"],
                                    metrics["cosine"], tol.describe(), p50, p90, "; ".join(notes)))
    return results


def check_file(path, runtime_names: Optional[Sequence[str]] = None, runs: int = 20,
               progress: Optional[Callable[[str], None]] = None, report=None) -> list[ParityResult]:
    """Rebuild the registered reference model named in the file's metadata and compare every runtime with it
    (the torch reference runtime's row times eager PyTorch; its error is 0 by construction).  ``report``: a JSON
    path for the results, checked before the work."""
    from . import models

    if report is not None:
        check_writable(report)
    file = formats.header(path)
    built = models.from_metadata(file.metadata, path)
    results = compare_model(built.module, list(built.inputs.values()), path, runtime_names, runs, progress,
                            file=file)
    if report is not None:
        write_json(results, report)
    return results


def compare_model(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path,
                  runtime_names: Optional[Sequence[str]] = None, runs: int = 20,
                  progress: Optional[Callable[[str], None]] = None,
                  file: Optional[formats.Header] = None) -> list[ParityResult]:
    """Compare an exported file (.onnx, .xml or .ort) with the module it came from, on the given inputs (Python API
    for any model).  ``runtime_names`` default to :func:`default_runtimes`; ``file``: its header, if already
    read."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    file = file or formats.header(path)
    meta = file.metadata
    feeds, reference = reference_outputs(module, example_inputs, path, file)
    names = list(runtime_names) if runtime_names else default_runtimes(meta)
    return check_sessions(reference, feeds, path, names, runs, progress=progress, module=module,
                          contents=onnxfile.Contents.of(meta))


def reference_outputs(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path,
                      file: Optional[formats.Header] = None):
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
    return reference + [n for n in runtimes.available()
                        if (not targets or n in targets) and format in runtimes.get(n).file_formats]


def check_available(names: Sequence[str]) -> list[str]:
    """Runtimes named explicitly must all run here: one error before any work, not a row after it."""
    for name in names:
        reasons = runtimes.get(name).machine_reasons()
        if reasons:
            raise EdgeAttnError(f"runtime {name} is not available: {'; '.join(reasons)}")
    return list(dict.fromkeys(names))


def describe(path, meta: Optional[Mapping] = None) -> str:
    """About an exported file, from its metadata (``meta``: already read): one line, then one line per distinct
    (mask, lowering)."""
    meta = formats.header(path).metadata if meta is None else meta
    nodes = meta.get("masks", [])
    lowerings = sorted({m.get("lowering", "?") for m in nodes})
    targets = meta.get("targets")
    lines = [f"{path}: model {meta.get('model', '(not a registered model)')}, opset {meta.get('opset', '?')}, "
             f"{len(nodes)} attention nodes, lowering {meta.get('lowering', '?')} -> {'/'.join(lowerings) or '-'}"
             f"{_form(meta)}"
             f"{' for ' + ', '.join(targets) if targets else ''}, mask tables {meta.get('table_bytes', 0) / 1e6:.2f} MB"]
    counts = Counter((mask_label(m), m.get("lowering", "?"), m.get("why", ""),
                      ", ".join(f"{rt} runs {how}" for rt, how in m.get("runs_as", {}).items())) for m in nodes)
    lines += [f"  {mask} x{n}: {low}" + (f" ({why})" if why else "") + (f"; {runs}" if runs else "")
              for (mask, low, why, runs), n in counts.items()]
    return "\n".join(lines)


def mask_label(node: Mapping) -> str:
    """An attention node's mask name (its ``masks`` metadata entry) as people read it.  A mask the model computes
    from its inputs (Mask2Former's) usually has no name: say so rather than print an empty one."""
    if node.get("mask"):
        return node["mask"]
    # no table bytes: nothing of the mask is stored, so the graph computes it (old files may not say)
    return "<computed in the graph>" if node.get("table_bytes") == 0 else "<unnamed>"


def _form(meta: Mapping) -> str:
    """How the attention is stored: standard ops (the default), custom op, or a deployment format."""
    form = formats.form_of(meta)
    return f" ({ {'standard': 'standard ops', 'custom-op': 'custom op'}.get(form, form + ' format')})"


def format_table(results: Sequence[ParityResult]) -> str:
    """A plain-text table: one row per runtime."""
    header = ("runtime", "status", "max_abs_err", "max_rel_err", "cosine", "tolerance", "p50_ms", "p90_ms")
    rows = [header]
    for r in results:
        rows.append((r.runtime, r.status, _num(r.max_abs_err, "{:.2e}"), _num(r.max_rel_err, "{:.2e}"),
                     _num(r.cosine, "{:.7f}"), r.tolerance or "-", _num(r.p50_ms, "{:.2f}"), _num(r.p90_ms, "{:.2f}")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    notes = [f"  {r.runtime}: {r.detail}" for r in results if r.detail and (r.status != "ok" or "NaN" in r.detail)]
    return "\n".join(lines + notes)


def _num(value, fmt):
    return "-" if value is None else fmt.format(value)


def write_json(results: Sequence[ParityResult], path) -> None:
    text = json.dumps([r.as_dict() for r in results], indent=2) + "\n"
    atomic_write(path, text.encode())
