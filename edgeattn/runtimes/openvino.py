"""OpenVINO CPU.  OpenVINO 2026.4 has no conversion rule for custom-domain nodes, even with a local function, so the
edgeattn functions are inlined into standard ops in memory before OpenVINO reads the model."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import onnx.inliner

from ..attention import ONNX_DOMAIN
from ..errors import EdgeAttnError, first_line
from .base import Runtime, Session, Tolerance, graph_inputs, io_info, read_onnx


class OpenVinoSession(Session):
    def __init__(self, runtime: str, path: Path, device: str):
        import openvino as ov

        model = read_onnx(path)
        self.runtime, self.inputs, self.outputs = runtime, graph_inputs(model), io_info(model.graph.output)
        if any(n.domain == ONNX_DOMAIN for n in model.graph.node):
            model = onnx.inliner.inline_local_functions(model)
        core = ov.Core()
        try:
            ov_model = core.read_model(model.SerializeToString(), b"")
            # fp32 files run in fp32: on CPUs with bf16/AMX OpenVINO would otherwise default to bf16.
            self._compiled = core.compile_model(ov_model, device, {"INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:
            raise EdgeAttnError(f"{path}: OpenVINO could not compile the model: {first_line(e)}") from e
        self._ports = [self._compiled.output(i) for i in range(len(self.outputs))]
        self._local = threading.local()  # an infer request is not thread-safe: one per calling thread

    def _run(self, feeds):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            results = request.infer(feeds)
        except Exception as e:
            raise EdgeAttnError(f"OpenVINO ({self.runtime}) failed to run: {first_line(e)}") from e
        return {info.name: results[port].copy() for info, port in zip(self.outputs, self._ports)}


class OpenVinoCpu(Runtime):
    name = "openvino-cpu"
    description = "OpenVINO, CPU plugin"
    tolerances = {"float32": Tolerance(atol=1e-4, min_cosine=0.99999)}

    @functools.cache  # noqa: B019  (one instance per process; asking OpenVINO for its devices is slow)
    def not_supported_reasons(self):
        try:
            import openvino as ov
        except ImportError:
            return ["openvino is not installed; install it with: pip install 'edgeattn[openvino]'"]
        if "CPU" not in ov.Core().available_devices:
            return ["OpenVINO reports no CPU device"]
        return []

    def _load(self, path):
        return OpenVinoSession(self.name, path, "CPU")
