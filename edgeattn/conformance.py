"""``edgeattn conformance``: small probe files, each pinning one semantic of masked attention that runtimes have got
wrong, run on each runtime and compared with PyTorch.

A probe is an ordinary edgeattn export of the unlisted model ``probe-attention`` (:mod:`edgeattn.models.probes`), or
of a registered model for the routed lowering, so ``--output DIR`` keeps the files and ``edgeattn check PROBE.onnx``
runs one on another device.  Runtimes load the files as a deployment would (not in accuracy mode), and each is held
to its parity tolerance for the probe's precision.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import models, parity, runtimes
from .errors import EdgeAttnError, InvalidArgument
from .files import atomic_write, check_writable
from .registered import export_registered


@dataclass(frozen=True)
class Probe:
    """One probe: the export of ``model`` (with ``config``, ``lowering`` and ``dtype``) whose outputs pin a
    semantic."""

    name: str
    pins: str  # the semantic, and where a runtime got it wrong
    config: dict = field(default_factory=dict)  # probe-attention config
    lowering: str = "auto"
    dtype: str = "fp32"
    model: str = "probe-attention"


PROBES = [
    Probe(
        "fully-masked-row",
        "a query row with no allowed key gives zeros, not NaN or mean(v) (onnx#8068)",
        {"mask": "empty_rows"},
        "dense",
    ),
    Probe(
        "causal-fewer-queries",
        "causal with 4 queries over 16 keys is aligned to the last key (onnxruntime#29020)",
        {"q_len": 4, "kv_len": 16},
        "dense",
    ),
    Probe(
        "window-edges",
        "a 5x5 neighborhood clamped at the edges of a 6x6 grid (NATTEN)",
        {"mask": "neighborhood", "grid": [6, 6]},
        "blocked",
    ),
    Probe(
        "sliding-window",
        "a query sees itself and 3 keys back, no further",
        {"mask": "sliding", "q_len": 32, "kv_len": 32},
        "blocked",
    ),
    Probe(
        "sinks",
        "2 sink keys plus a window of 4 back (StreamingLLM)",
        {"mask": "sinks", "q_len": 32, "kv_len": 32},
        "dense",
    ),
    Probe(
        "gqa-grouping",
        "4 query heads share 2 key/value heads, heads 0-1 the first (repeat_interleave)",
        {"heads": 4, "kv_heads": 2},
        "dense",
    ),
    Probe(
        "softcap-before-mask",
        "scores are soft-capped (50 tanh(s/50)) before the mask, as Gemma 2 does",
        {"mask": "sliding", "q_len": 32, "kv_len": 32, "softcap": 50.0, "scale_inputs": 4.0},
        "dense",
    ),
    *[
        Probe(
            f"inf-mask-{dtype}",
            f"masked scores of -inf in a {dtype} file stay out of the softmax, no NaN",
            {"mask": "empty_rows"},
            "dense",
            dtype,
        )
        for dtype in ("fp16", "bf16")
    ],
    Probe(
        "fp32-computed-in-fp32",
        "an fp32 file computes in fp32: values of 10 +- 1 through attention lose 2 decimals in bf16",
        {"value_offset": 10.0, "q_len": 64, "kv_len": 64},
        "dense",
    ),
    Probe(
        "large-gather-range",
        "a block table gathering keys 2k tokens apart (sinks at 0, window at 2047)",
        {"mask": "sinks", "q_len": 2048, "kv_len": 2048, "heads": 1, "kv_heads": 1, "head_dim": 4},
        "blocked",
    ),
    *[
        Probe(
            f"lowering-{lowering}", f"the {lowering} lowering on a causal mask", {"q_len": 64, "kv_len": 64}, lowering
        )
        for lowering in ("dense", "blocked", "attention", "contrib")
    ],
    Probe(
        "lowering-routed",
        "the routed lowering (MoBA: top-k key blocks per query block)",
        {"seq_len": 256, "block": 32, "dim": 16, "heads": 1},
        "auto",
        model="moba-block",
    ),
]


@dataclass
class ProbeResult:
    """One probe on one runtime: ``ok``, ``wrong`` (``detail`` says by how much) or ``refused`` (``detail`` says
    why); ``file`` is the probe file when kept (``output``)."""

    probe: str
    runtime: str
    status: str  # ok | wrong | refused
    detail: str = ""
    max_abs_err: Optional[float] = None
    file: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run(
    runtime_names: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[str]] = None,
    output=None,
    report=None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[ProbeResult]:
    """Export every probe of ``dtypes`` (default fp32, fp16, bf16) and run it on each runtime (default: every
    available ONNX runtime).  ``output``: a folder to keep the probe files in; ``report``: a JSON path."""
    if report is not None:
        check_writable(report)
    names = [runtimes.get(n).name for n in runtime_names] if runtime_names else runtimes.available()
    names = [n for n in dict.fromkeys(names) if "onnx" in runtimes.get(n).file_formats]
    if not names:
        raise InvalidArgument("no runtime to probe: name ONNX runtimes (`edgeattn runtimes` lists them)")
    chosen = list(dtypes or ("fp32", "fp16", "bf16"))
    unknown = [d for d in chosen if d not in ("fp32", "fp16", "bf16")]
    if unknown:
        raise InvalidArgument(f"unknown dtype {unknown[0]!r}; choose from fp32, fp16, bf16")
    parity.check_available(names)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeattn-probes-") as tmp:
        folder = Path(output) if output is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for probe in (p for p in PROBES if p.dtype in chosen):
            if progress:
                progress(probe.name)
            results += _run_probe(probe, names, folder / f"{probe.name}.onnx", output is not None)
    if report is not None:
        atomic_write(report, (json.dumps([r.as_dict() for r in results], indent=2) + "\n").encode())
    return results


def _run_probe(probe: Probe, names: list[str], path: Path, kept: bool) -> list[ProbeResult]:
    file = str(path) if kept else ""
    try:
        export_registered(
            probe.model,
            path,
            lowering=probe.lowering,
            dtype=probe.dtype,
            opset=23 if probe.lowering == "attention" else None,
            runtimes=_targets(probe),
            **probe.config,
        )
    except EdgeAttnError as e:
        return [ProbeResult(probe.name, n, "refused", f"export: {e}", file=file) for n in names]
    built = models.build(probe.model, **probe.config)
    compared = parity.compare_model(built.module, list(built.inputs.values()), path, names, runs=1, accuracy=False)
    checked = {r.runtime: r for r in compared}
    results = []
    for name in names:
        r = checked[name]
        r.detail = r.detail.replace(f"{path}: ", "")  # the probe is named in its row
        if r.status == "ok":
            results.append(ProbeResult(probe.name, name, "ok", f"max abs err {r.max_abs_err:.1e}", r.max_abs_err, file))
        elif r.status == "fail":
            results.append(
                ProbeResult(
                    probe.name,
                    name,
                    "wrong",
                    f"max abs err {r.max_abs_err:.1e}, cosine {r.cosine:.5f} (gate {r.tolerance})"
                    + (f"; {r.detail}" if r.detail else ""),
                    r.max_abs_err,
                    file,
                )
            )
        else:
            results.append(ProbeResult(probe.name, name, "refused", r.detail, file=file))
    return results


def _targets(probe: Probe) -> Optional[list[str]]:
    """contrib is onnxruntime's alone; every other probe is for every runtime."""
    return ["ort-cpu", "ort-cuda"] if probe.lowering == "contrib" else None


def format_table(results: Sequence[ProbeResult]) -> str:
    pins = {p.name: p.pins for p in PROBES}
    width = max(len("probe"), *(len(r.probe) for r in results))
    rw = max(len("runtime"), *(len(r.runtime) for r in results))
    lines = [f"{'probe':{width}s}  {'runtime':{rw}s}  result"]
    for r in results:
        lines.append(f"{r.probe:{width}s}  {r.runtime:{rw}s}  {r.status}: {r.detail}")
    lines += ["", "what each probe pins:"] + [
        f"  {name}: {pins[name]}" for name in dict.fromkeys(r.probe for r in results)
    ]
    return "\n".join(lines)
