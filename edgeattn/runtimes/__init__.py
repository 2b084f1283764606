"""Runtime registry and ``load(path, runtime="auto")``.  Optional backends are imported only when used."""

from __future__ import annotations

from ..errors import EdgeAttnError, InvalidArgument, RuntimeUnavailable
from ..onnxfile import Contents, formats
from .base import Runtime, Session, TensorInfo, Tolerance
from .openvino import OpenVinoCpu
from .ort import OrtCpu, OrtCuda
from .reference import TorchRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), OrtCpu(), OrtCuda(), OpenVinoCpu())}
# `auto` takes the first available of these that runs the file; the torch reference runs the module a file came
# from (a registered model, rebuilt from the metadata, or the module given to parity.compare_model).
AUTO_ORDER = ("ort-cuda", "ort-cpu", "openvino-cpu")
# what a file is for when no target is named: every runtime that runs the file itself
ONNX_RUNTIMES = tuple(name for name, runtime in RUNTIMES.items() if not runtime.reference)


def runtime_names() -> list[str]:
    return list(RUNTIMES)


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise InvalidArgument(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def available() -> list[str]:
    """Names of the ONNX runtimes that can run here, in ``auto`` preference order."""
    return [n for n in AUTO_ORDER if get(n).is_available()]


def resolve(name: str, path=None) -> Runtime:
    """The runtime ``name``; ``auto``: the first available one that runs the file at ``path`` (if given)."""
    if name != "auto":
        return get(name)
    names = available()
    if not names:
        raise RuntimeUnavailable("no ONNX runtime is available; install one: pip install 'edgeattn[all]'")
    if path is None:
        return get(names[0])
    contents = Contents.of(formats.header(path).metadata)
    refused = {n: get(n).not_supported_reasons(contents) for n in names}
    able = [n for n in names if not refused[n]]
    if not able:
        raise EdgeAttnError(
            f"{path}: no available runtime can run it: " + "; ".join(f"{n}: {'; '.join(r)}" for n, r in refused.items())
        )
    return get(able[0])


def load(path, runtime: str = "auto", accuracy: bool = False, module=None) -> Session:
    """Load an ONNX file, OpenVINO IR (.xml) or ORT-format file (.ort) on a runtime (``auto``: the first available
    of ort-cuda, ort-cpu, openvino-cpu that runs it: a bf16 file skips onnxruntime's CPU provider, an IR goes to
    OpenVINO).

    ``accuracy=True`` keeps the runtime from computing below the file's precision (what parity checks use).
    ``module``: for the ``torch`` runtime, the PyTorch module the file came from (it runs that module)."""
    return resolve(runtime, path).load(path, accuracy, module)


__all__ = [
    "ONNX_RUNTIMES",
    "RUNTIMES",
    "Runtime",
    "Session",
    "TensorInfo",
    "Tolerance",
    "available",
    "get",
    "load",
    "runtime_names",
]
