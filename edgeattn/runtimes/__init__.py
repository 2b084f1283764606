"""Runtime registry and ``load(path, runtime="auto")``.  Optional backends are imported only when used."""
from __future__ import annotations

from ..errors import EdgeAttnError
from .base import Runtime, Session, TensorInfo, Tolerance
from .openvino import OpenVinoCpu
from .ort import OrtCpu, OrtCuda
from .reference import TorchRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), OrtCpu(), OrtCuda(), OpenVinoCpu())}
# `auto` takes the first available of these; the torch reference only runs files of registered models.
AUTO_ORDER = ("ort-cuda", "ort-cpu", "openvino-cpu")
# what a file is for when no target is named: every runtime that runs the file itself
ONNX_RUNTIMES = tuple(name for name, runtime in RUNTIMES.items() if not runtime.reference)


def runtime_names() -> list[str]:
    return list(RUNTIMES)


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise EdgeAttnError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def available() -> list[str]:
    """Names of the ONNX runtimes that can run here, in ``auto`` preference order."""
    return [n for n in AUTO_ORDER if get(n).is_available()]


def resolve(name: str) -> Runtime:
    if name != "auto":
        return get(name)
    names = available()
    if not names:
        raise EdgeAttnError("no ONNX runtime is available; install one: pip install 'edgeattn[all]'")
    return get(names[0])


def load(path, runtime: str = "auto", accuracy: bool = False) -> Session:
    """Load an ONNX file on a runtime (``auto``: the first available of ort-cuda, ort-cpu, openvino-cpu).

    ``accuracy=True`` keeps the runtime from computing below the file's precision (what parity checks use)."""
    return resolve(runtime).load(path, accuracy)


__all__ = ["ONNX_RUNTIMES", "RUNTIMES", "Runtime", "Session", "TensorInfo", "Tolerance", "available", "get", "load",
           "runtime_names"]
