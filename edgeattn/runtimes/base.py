"""The Runtime / Session contract every backend implements, and the checks they share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from ..attention import ONNX_DOMAIN, ONNX_OP_VERSION
from ..errors import EdgeAttnError, first_line


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple            # ints for static axes, names for symbolic ones
    dtype: np.dtype


@dataclass(frozen=True)
class Tolerance:
    """Parity gate for one runtime and precision: no NaN/inf the reference lacks, cosine >= min_cosine, and
    max |out - ref| <= atol (fp32) or max |out - ref| / max |ref| <= rtol (reduced precision, where the error scales
    with the outputs).  A bound left None is not checked."""
    min_cosine: float
    atol: Optional[float] = None
    rtol: Optional[float] = None

    def passes(self, max_abs_err: float, max_rel_err: float, cosine: float) -> bool:
        return (cosine >= self.min_cosine and (self.atol is None or max_abs_err <= self.atol)
                and (self.rtol is None or max_rel_err <= self.rtol))

    def describe(self) -> str:
        bounds = ([f"abs {self.atol:.0e}"] if self.atol is not None else []) + \
                 ([f"rel {self.rtol:.0e}"] if self.rtol is not None else [])
        return " ".join(bounds + [f"cos {self.min_cosine:g}"])


# What a file's precision (export metadata) is checked against on the CPU runtimes, from the fp32 PyTorch model.
# Reduced precision is gated on error relative to the largest output and on cosine; tests/test_model_zoo_targets.py
# checks every registered model against them (the worst measured: ppma-t int8 cosine 0.99987, bf16 rel 6e-3).
REDUCED_PRECISION = {"fp16": Tolerance(min_cosine=0.9995, rtol=2e-2),
                     "bf16": Tolerance(min_cosine=0.995, rtol=8e-2),
                     "int8": Tolerance(min_cosine=0.995),
                     "int8-static": Tolerance(min_cosine=0.98)}


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
    tolerances: Mapping[str, Tolerance] = {}

    def not_supported_reasons(self) -> list[str]:
        """Why this runtime cannot run here; empty when it can."""
        return []

    def is_available(self) -> bool:
        return not self.not_supported_reasons()

    def tolerance(self, precision: str = "fp32") -> Tolerance:
        if precision not in self.tolerances:
            raise EdgeAttnError(f"{self.name} has no parity tolerance for {precision} files yet "
                                f"(known: {', '.join(self.tolerances)})")
        return self.tolerances[precision]

    def load(self, path, accuracy: bool = False) -> Session:
        """Load ``path``.  ``accuracy=True`` asks the runtime not to lower precision below the file's own
        (parity runs); by default it may, for speed (OpenVINO's bf16/f16 inference precision)."""
        reasons = self.not_supported_reasons()
        if reasons:
            raise EdgeAttnError(f"runtime {self.name} is not available: {'; '.join(reasons)}")
        return self._load(Path(path), accuracy)

    def _load(self, path: Path, accuracy: bool) -> Session:
        raise NotImplementedError


def read_onnx(path, weights: bool = False) -> onnx.ModelProto:
    """Load an ONNX file or say in one line why it cannot be used.

    ``weights=True`` also loads tensors stored as external data (``torch.onnx.export`` writes ``model.onnx.data``
    beside the file); their locations must be files inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise EdgeAttnError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise EdgeAttnError(f"{path}: not an ONNX model, or truncated/corrupted (could not parse it as an ONNX "
                            f"protobuf)") from None
    if not model.graph.node and not model.graph.output:
        raise EdgeAttnError(f"{path}: not an ONNX model (no graph in the file)")
    for op in model.opset_import:
        if op.domain == ONNX_DOMAIN and op.version > ONNX_OP_VERSION:
            raise EdgeAttnError(f"{path}: uses {ONNX_DOMAIN} opset {op.version}, this edgeattn knows up to "
                                f"{ONNX_OP_VERSION}; upgrade edgeattn or re-export the file")
    _check_external_data(model, path)   # even when not loading it: a file pointing elsewhere is refused everywhere
    if weights:
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as e:
            raise EdgeAttnError(f"{path}: could not read its external data: {first_line(e)}") from e
    return model


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data location must be a relative path to an existing file inside the model's folder
    (after resolving ``..`` and symlinks): a model from elsewhere must not make us read other files."""
    folder = path.resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents or not target.is_file():
            raise EdgeAttnError(f"{path}: tensor {tensor.name!r} points at external data {location!r}, which is not "
                                f"a file inside {folder}; keep the .onnx and its data file together")


def io_info(values: Sequence[onnx.ValueInfoProto]) -> list[TensorInfo]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        out.append(TensorInfo(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return out


def graph_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    initializers = {i.name for i in model.graph.initializer}
    return io_info([v for v in model.graph.input if v.name not in initializers])


def nonfinite_inputs(feeds: Mapping[str, np.ndarray]) -> list[str]:
    """Names of float feeds holding NaN or inf: such feeds run, and reports flag them."""
    return [name for name, a in feeds.items()
            if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()]


def check_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Same validation and wording on every runtime: names, dtype and static dimensions."""
    expected = {i.name: i for i in inputs}
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise EdgeAttnError(f"feeds do not match the model inputs: missing {missing}, unexpected {extra}; "
                            f"expected {list(expected)}")
    out = {}
    for name, info in expected.items():
        array = np.asarray(feeds[name])
        if array.dtype != info.dtype:
            raise EdgeAttnError(f"input {name!r}: expected dtype {info.dtype}, got {array.dtype}")
        if array.ndim != len(info.shape) or any(isinstance(d, int) and d != a for d, a in zip(info.shape, array.shape)):
            raise EdgeAttnError(f"input {name!r}: expected shape {info.shape}, got {array.shape}")
        out[name] = np.ascontiguousarray(array)
    return out
