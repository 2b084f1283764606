"""LiteRT (``ai-edge-litert``, formerly TensorFlow Lite): ``.tflite`` files, as onnx2tf writes them from an edgeattn
file.  A model runs by its signature, which onnx2tf writes with the ONNX names in and out; a TFLite file carries no
edgeattn metadata, so ``check`` takes the ONNX file it was converted from (``--source``) for the PyTorch reference."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import EdgeAttnError, first_line
from ..onnxfile.formats import tflite_interpreter, tflite_io
from .base import REDUCED_PRECISION, Runtime, Session, Tolerance


class LiteRtSession(Session):
    def __init__(self, runtime: Runtime, path: Path) -> None:
        self.runtime = runtime.name
        self._interpreter, self._runner = tflite_interpreter(path)
        self.inputs, self.outputs = tflite_io(self._runner)

    def _run(self, feeds):
        try:
            results = self._runner(**feeds)
        except Exception as e:
            raise EdgeAttnError(f"LiteRT ({self.runtime}) failed to run: {first_line(e)}") from e
        return {info.name: np.array(results[info.name]) for info in self.outputs}


class LiteRt(Runtime):
    name = "litert"
    description = "LiteRT (ai-edge-litert), CPU: .tflite files"
    tolerances = {"fp32": Tolerance(atol=1e-4, min_cosine=0.99999), **REDUCED_PRECISION}
    file_formats = frozenset({"tflite"})

    @functools.cache
    def machine_reasons(self) -> list[str]:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            return ["ai-edge-litert is not installed; install it with: pip install 'edgeattn[litert]'"]
        return []

    def _load(self, path, accuracy, module, observe=()):
        if observe:
            raise EdgeAttnError(f"{path}: a TFLite file cannot return tensors inside its graph")
        return LiteRtSession(self, path)
