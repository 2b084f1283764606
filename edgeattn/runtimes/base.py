"""The Runtime / Session contract every backend implements, and the checks they share.

A runtime declares what it can run (xformers-style): the precisions it has a parity gate for and those it refuses,
the node bodies (lowerings) it executes, and how it executes dense-table nodes of ``auto`` files (``runs_as``).
:meth:`Runtime.not_supported_reasons` answers for this machine, for a file's :class:`~edgeattn.onnxfile.Contents`,
or both; export's target check, ``auto``, parity and bench all ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import EdgeAttnError, InvalidArgument, RuntimeUnavailable
from ..onnxfile import LOWERINGS, Contents, TensorInfo, formats


@dataclass(frozen=True)
class Tolerance:
    """Parity gate for one runtime and precision: no NaN/inf the reference lacks, cosine >= min_cosine, and
    max |out - ref| <= atol (fp32) or max |out - ref| / max |ref| <= rtol (reduced precision, where the error scales
    with the outputs).  A bound left None is not checked.

    ``decision_eps``: the largest margin ``|value - threshold|`` at which a declared hard decision
    (:mod:`edgeattn.decisions`) that comes out the other way on the runtime counts as a tie, not an error."""

    min_cosine: float
    atol: Optional[float] = None
    rtol: Optional[float] = None
    decision_eps: float = 1e-4

    def passes(self, max_abs_err: float, max_rel_err: float, cosine: float) -> bool:
        return (
            cosine >= self.min_cosine
            and (self.atol is None or max_abs_err <= self.atol)
            and (self.rtol is None or max_rel_err <= self.rtol)
        )

    def describe(self) -> str:
        if self.atol == 0 and self.min_cosine == 1:
            return "exact"
        bounds = ([f"abs {self.atol:.0e}"] if self.atol is not None else []) + (
            [f"rel {self.rtol:.0e}"] if self.rtol is not None else []
        )
        return " ".join(bounds + [f"cos {self.min_cosine:g}"])


# What a file's precision (export metadata) is checked against on the CPU runtimes, from the fp32 PyTorch model.
# Reduced precision is gated on error relative to the largest output and on cosine; tests/test_model_zoo_targets.py
# checks every registered model against them, so a bound that some model misses fails there.  How int8 came to meet
# its gate on a CPU without VNNI: benchmarks/RESULTS.md, 2026-11-30 (architecture refactor ... and 7-bit int8 weights).
REDUCED_PRECISION = {
    "fp16": Tolerance(min_cosine=0.9995, rtol=2e-2, decision_eps=1e-2),
    "bf16": Tolerance(min_cosine=0.995, rtol=8e-2, decision_eps=3e-2),
    "int8": Tolerance(min_cosine=0.995, decision_eps=3e-2),
    "int8-static": Tolerance(min_cosine=0.98, decision_eps=5e-2),
}


class Session:
    """A loaded model.  ``run`` takes and returns numpy arrays keyed by the model's input/output names."""

    runtime: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(check_feeds(self.inputs, feeds))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Runtime:
    name: str = ""
    description: str = ""
    tolerances: Mapping[str, Tolerance] = {}  # the parity gate per file precision
    refused_precisions: Mapping[str, str] = {}  # precision -> why it cannot run files of it
    lowerings: frozenset = frozenset(LOWERINGS)  # the node bodies it executes
    file_formats: frozenset = frozenset({"onnx"})  # the file formats it loads (edgeattn.onnxfile.formats)
    # how it executes a dense-table node of lowering L: runs_as.get(L, L), in files exported with lowering auto
    # (or in every file, with runs_as_always) -- the file keeps its portable body, the runtime swaps at load
    runs_as: Mapping[str, str] = {}
    runs_as_always: bool = False
    reference: bool = False  # runs the torch model a file came from, not the file

    def machine_reasons(self) -> list[str]:
        """Why this runtime cannot run on this machine (not installed, no device); empty when it can."""
        return []

    def not_supported_reasons(self, contents: Optional[Contents] = None, here: bool = True) -> list[str]:
        """Why this runtime cannot run a file with ``contents`` (None: any file) on this machine (``here=False``:
        on a machine that has it, which is what an export for it asks); empty when it can."""
        reasons = list(self.machine_reasons()) if here else []  # a copy: machine_reasons may be cached
        if contents is not None:
            if contents.format not in self.file_formats:
                reasons.append(
                    f"{self.name} does not load {contents.format} files (it loads "
                    f"{', '.join(sorted(self.file_formats))})"
                )
            refused = self.refused_precisions.get(contents.precision)
            reasons += [refused] if refused else []
            others = sorted(contents.lowerings - self.lowerings)
            if others:
                runs = sorted(self.lowerings)
                reasons.append(f"{self.name} does not run the {', '.join(others)} lowering (it runs {', '.join(runs)})")
        return reasons

    def is_available(self) -> bool:
        return not self.machine_reasons()

    def check_file(self, metadata: Mapping[str, Any], path) -> None:
        """One clear error when the file at ``path``, with ``metadata``, holds what this runtime cannot run."""
        reasons = self.not_supported_reasons(Contents.of(metadata), here=False)
        if reasons:
            raise EdgeAttnError(f"{path}: {self.name} cannot run this file: {'; '.join(reasons)}")

    def executes(self, lowering: str, requested: str = "auto", softcap: bool = False) -> str:
        """What this runtime runs for a node of ``lowering`` in a file exported with lowering ``requested``; a node
        that soft-caps its scores keeps its body unless the swap's can too (MultiHeadAttention and OpenVINO's SDPA
        cannot)."""
        target = self.runs_as.get(lowering, lowering) if self.runs_as_always or requested == "auto" else lowering
        if softcap and not (target in LOWERINGS and LOWERINGS[target].softcap):
            return lowering
        return target

    def tolerance(self, precision: str = "fp32") -> Tolerance:
        if precision not in self.tolerances:
            raise EdgeAttnError(
                f"{self.name} has no parity tolerance for {precision} files yet (known: {', '.join(self.tolerances)})"
            )
        return self.tolerances[precision]

    def load(self, path, accuracy: bool = False, module: Any = None, observe: Sequence[str] = ()) -> Session:
        """Load ``path``.  ``accuracy=True`` asks the runtime not to lower precision below the file's own
        (parity runs); by default it may, for speed (OpenVINO's bf16/f16 inference precision).  ``module`` is the
        torch module the file came from, for the reference runtime (the others run the file).  ``observe``: names
        of tensors inside the graph that ``run`` also returns, under those names (parity reads a file's declared
        decisions this way; the reference runtime has none to return)."""
        reasons = self.machine_reasons()
        if reasons:
            raise RuntimeUnavailable(f"runtime {self.name} is not available: {'; '.join(reasons)}")
        format = formats.format_of(path)
        if not self.reference and format not in self.file_formats:
            raise InvalidArgument(
                f"{path}: {self.name} does not load {format} files (it loads {', '.join(sorted(self.file_formats))})"
            )
        return self._load(Path(path), accuracy, module, tuple(observe))

    def _load(self, path: Path, accuracy: bool, module: Any, observe: tuple[str, ...] = ()) -> Session:
        raise NotImplementedError


def nonfinite_inputs(feeds: Mapping[str, np.ndarray]) -> list[str]:
    """Names of float feeds holding NaN or inf: such feeds run, and reports flag them."""
    return [
        name
        for name, a in feeds.items()
        if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()
    ]


def check_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Same validation and wording on every runtime: names, dtype and static dimensions."""
    expected = {i.name: i for i in inputs}
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise InvalidArgument(
            f"feeds do not match the model inputs: missing {missing}, unexpected {extra}; expected {list(expected)}"
        )
    out = {}
    for name, info in expected.items():
        array = np.asarray(feeds[name])
        if array.dtype != info.dtype:
            raise InvalidArgument(f"input {name!r}: expected dtype {info.dtype}, got {array.dtype}")
        if array.ndim != len(info.shape) or any(isinstance(d, int) and d != a for d, a in zip(info.shape, array.shape)):
            raise InvalidArgument(f"input {name!r}: expected shape {info.shape}, got {array.shape}")
        out[name] = np.ascontiguousarray(array)
    return out
