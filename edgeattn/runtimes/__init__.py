"""Runtime registry and ``load(path, runtime="auto")``.  Optional backends are imported only when used."""

from __future__ import annotations

from ..errors import EdgeAttnError, InvalidArgument, RuntimeUnavailable
from ..onnxfile import Contents, formats
from .base import Runtime, Session, TensorInfo, Tolerance
from .litert import LiteRt
from .openvino import OpenVinoCpu, device_runtime
from .ort import OrtCpu, OrtCuda, provider_runtime
from .reference import TorchRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), OrtCpu(), OrtCuda(), OpenVinoCpu(), LiteRt())}
# `auto` takes the first available of these that runs the file; the torch reference runs the module a file came
# from (a registered model, rebuilt from the metadata, or the module given to parity.compare_model).
AUTO_ORDER = ("ort-cuda", "ort-cpu", "openvino-cpu", "litert")
# what an ONNX file is for when no target is named: every runtime that runs ONNX files itself
ONNX_RUNTIMES = tuple(n for n, r in RUNTIMES.items() if not r.reference and "onnx" in r.file_formats)


def runtime_names() -> list[str]:
    return list(RUNTIMES)


# runtimes named by provider or device (ort:<ExecutionProvider>, openvino:<DEVICE>), made when first named
FAMILIES = {"ort": provider_runtime, "openvino": device_runtime}
_named: dict[str, Runtime] = {}


def get(name: str) -> Runtime:
    """The runtime ``name``: one of :data:`RUNTIMES`, ``ort:<ExecutionProvider>[,key=value...]`` (provider options)
    or ``openvino:<DEVICE>``; ``ort:CPUExecutionProvider`` is ``ort-cpu``, ``ort:CUDAExecutionProvider``
    ``ort-cuda`` and ``openvino:CPU`` ``openvino-cpu``."""
    if name in RUNTIMES:
        return RUNTIMES[name]
    family, colon, spec = name.partition(":")
    if not colon or family not in FAMILIES:
        raise InvalidArgument(
            f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}, ort:<ExecutionProvider> or "
            "openvino:<DEVICE> (`edgeattn runtimes` lists those here)"
        )
    if name not in _named:
        made = FAMILIES[family](spec)
        _named[name] = RUNTIMES.get(made.name, made)
    return _named[name]


def discovered() -> list[str]:
    """Runtimes this machine has beyond the named ones: each provider the installed onnxruntime reports, each device
    OpenVINO sees, and OpenVINO's AUTO."""
    names = []
    try:
        import onnxruntime as ort

        names += [f"ort:{p}" for p in ort.get_available_providers()]
    except ImportError:
        pass
    try:
        import openvino as ov

        names += [f"openvino:{d}" for d in [*ov.Core().available_devices, "AUTO"]]
    except ImportError:
        pass
    return [n for n in names if get(n).name not in RUNTIMES]


def available(format: str = "onnx") -> list[str]:
    """Names of the runtimes that can run here and load files of ``format`` (onnx, openvino, ort, tflite), in
    ``auto`` preference order."""
    return [n for n in AUTO_ORDER if format in get(n).file_formats and get(n).is_available()]


def resolve(name: str, path=None) -> Runtime:
    """The runtime ``name``; ``auto``: the first available one that runs the file at ``path`` (if given)."""
    if name != "auto":
        return get(name)
    file = formats.header(path) if path is not None else None
    names = available(file.format if file else "onnx")
    if not names:
        raise RuntimeUnavailable(
            f"no runtime here loads {file.format if file else 'onnx'} files; install one: pip install 'edgeattn[all]'"
        )
    if file is None:
        return get(names[0])
    contents = Contents.of({**file.metadata, "format": file.format})  # a file from elsewhere has no metadata
    refused = {n: get(n).not_supported_reasons(contents) for n in names}
    able = [n for n in names if not refused[n]]
    if not able:
        raise EdgeAttnError(
            f"{path}: no available runtime can run it: " + "; ".join(f"{n}: {'; '.join(r)}" for n, r in refused.items())
        )
    return get(able[0])


def load(path, runtime: str = "auto", accuracy: bool = False, module=None) -> Session:
    """Load an ONNX file, OpenVINO IR (.xml), ORT-format file (.ort) or TFLite model (.tflite) on a runtime
    (``auto``: the first available of ort-cuda, ort-cpu, openvino-cpu, litert that runs it: a bf16 file skips
    onnxruntime's CPU provider, an IR goes to OpenVINO, a TFLite model to LiteRT).  ``runtime``: a name from
    :data:`RUNTIMES`, ``ort:<ExecutionProvider>[,key=value...]`` or ``openvino:<DEVICE>`` (see :func:`get`).

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
    "discovered",
    "get",
    "load",
    "runtime_names",
]
