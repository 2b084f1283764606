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

from . import runtimes
from ._files import atomic_write
from .errors import EdgeAttnError
from .export import metadata, precision as precisions
from .runtimes.base import graph_inputs, nonfinite_inputs, read_onnx


@dataclass
class ParityResult:
    runtime: str
    status: str                      # ok | fail | unavailable | error
    ok: bool
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    cosine: Optional[float] = None
    tolerance: str = ""
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict:
    """Worst-case error metrics over the reference's outputs."""
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "cosine": 1.0, "nonfinite": False}
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(outputs[name], dtype=np.float64)
        if out.shape != ref.shape:
            raise EdgeAttnError(f"output {name!r}: runtime gave shape {out.shape}, reference {ref.shape}")
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
                   progress: Optional[Callable[[str], None]] = None, accuracy: bool = True) -> list[ParityResult]:
    """Load ``path`` on each runtime, compare with ``reference`` and time it.  Never raises for one runtime.

    ``accuracy`` loads runtimes in accuracy mode (the parity gate); bench loads them as a deployment would."""
    results = []
    for name in runtime_names:
        runtime = runtimes.get(name)
        if progress:
            progress(name)
        reasons = runtime.not_supported_reasons() or precisions.refusal(name, precision)
        if reasons:
            results.append(ParityResult(name, "unavailable", False, detail="; ".join(reasons)))
            continue
        try:
            tol = runtime.tolerance(precision)
            session = runtime.load(path, accuracy=accuracy)
            metrics = compare(reference, session.run(feeds))
            p50, p90 = latency(lambda: session.run(feeds), runs=runs)
        except EdgeAttnError as e:
            results.append(ParityResult(name, "error", False, detail=str(e)))
            continue
        ok = not metrics["nonfinite"] and tol.passes(metrics["max_abs_err"], metrics["max_rel_err"], metrics["cosine"])
        notes = ["NaN/inf do not match the reference"] if metrics["nonfinite"] else []
        flagged = nonfinite_inputs(feeds)
        notes += [f"inputs with NaN/inf: {', '.join(flagged)}"] if flagged else []
        detail = "; ".join(notes)
        results.append(ParityResult(name, "ok" if ok else "fail", ok, metrics["max_abs_err"], metrics["max_rel_err"],
                                    metrics["cosine"], tol.describe(), p50, p90, detail))
    return results


def check_file(path, runtime_names: Optional[Sequence[str]] = None, runs: int = 20,
               progress: Optional[Callable[[str], None]] = None) -> list[ParityResult]:
    """Rebuild the registered reference model named in the file's metadata and compare every runtime with it.

    The torch row times eager PyTorch on the same inputs (its error is 0 by construction)."""
    from . import models

    model = read_onnx(path)
    built = models.from_metadata(model, path)
    return _compare(built.module, list(built.inputs.values()), path, model, runtime_names, runs, progress)


def compare_model(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path,
                  runtime_names: Optional[Sequence[str]] = None, runs: int = 20,
                  progress: Optional[Callable[[str], None]] = None) -> list[ParityResult]:
    """Compare an exported file with the module it came from, on the given inputs (Python API for any model)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    return _compare(module, example_inputs, path, read_onnx(path), runtime_names, runs, progress)


def _compare(module, example_inputs, path, model, runtime_names, runs, progress) -> list[ParityResult]:
    """compare_model on the file's already parsed ``model`` (the runtimes load the file themselves)."""
    feeds, reference = reference_outputs(module, example_inputs, path, model)
    meta = metadata.read(model)
    precision = meta.get("precision", "fp32")
    names = list(runtime_names) if runtime_names else _runtimes_for(meta.get("targets"))
    results = []
    if "torch" in names:  # timed first: idle runtime thread pools left spinning would slow eager torch down
        results.append(time_eager(module, example_inputs, runs))
    return results + check_sessions(reference, feeds, path, [n for n in names if n != "torch"], runs, precision,
                                    progress=progress)


def reference_outputs(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path, model=None):
    """The file's feeds for ``example_inputs`` and eager torch's outputs under the file's output names
    (``model``: the file already parsed)."""
    model = read_onnx(path) if model is None else model
    input_infos, outputs = graph_inputs(model), [o.name for o in model.graph.output]
    if len(input_infos) != len(example_inputs):
        raise EdgeAttnError(f"{path} has {len(input_infos)} inputs, {len(example_inputs)} example inputs given")
    feeds = {info.name: _numpy(t) for info, t in zip(input_infos, example_inputs)}
    flat = torch.utils._pytree.tree_leaves(_eager(module, example_inputs))  # the exporter flattens outputs the same way
    if len(flat) != len(outputs):
        raise EdgeAttnError(f"{path} has {len(outputs)} outputs, the model returns {len(flat)} tensors")
    return feeds, {name: _numpy(t) for name, t in zip(outputs, flat)}


def time_eager(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], runs: int = 20) -> ParityResult:
    p50, p90 = latency(lambda: _eager(module, example_inputs), runs=runs)
    return ParityResult("torch", "ok", True, 0.0, 0.0, 1.0, "exact", p50, p90, "reference (eager)")


def default_runtimes(path=None) -> list[str]:
    """What a check covers when no runtime is named: the torch reference and every available ONNX runtime the
    file was exported for (its ``targets`` metadata: a contrib-lowered file is for onnxruntime only)."""
    return _runtimes_for(metadata.read(read_onnx(path)).get("targets") if path is not None else None)


def _runtimes_for(targets) -> list[str]:
    return ["torch"] + [n for n in runtimes.available() if not targets or n in targets]


def _eager(module, inputs):
    was_training = module.training
    try:
        with torch.no_grad():
            return module.eval()(*inputs)
    finally:
        module.train(was_training)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def describe(path) -> str:
    """About an exported file, from its metadata: one line, then one line per distinct (mask, lowering)."""
    meta = metadata.read(read_onnx(path))
    nodes = meta.get("masks", [])
    lowerings = sorted({m.get("lowering", "?") for m in nodes})
    targets = meta.get("targets")
    lines = [f"{path}: model {meta.get('model', '(not a registered model)')}, opset {meta.get('opset', '?')}, "
             f"{len(nodes)} attention nodes, lowering {meta.get('lowering', '?')} -> {'/'.join(lowerings) or '-'}"
             f"{' (inlined)' if meta.get('inline') else ''}"
             f"{' for ' + ', '.join(targets) if targets else ''}, mask tables {meta.get('table_bytes', 0) / 1e6:.2f} MB"]
    counts = Counter((m.get("mask", "?"), m.get("lowering", "?"), m.get("why", ""),
                      ", ".join(f"{rt} runs {how}" for rt, how in m.get("runs_as", {}).items())) for m in nodes)
    lines += [f"  {mask} x{n}: {low}" + (f" ({why})" if why else "") + (f"; {runs}" if runs else "")
              for (mask, low, why, runs), n in counts.items()]
    return "\n".join(lines)


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
