"""onnxruntime: ``ort-cpu`` and ``ort-cuda``.  ORT expands the edgeattn local functions itself."""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, cast

import numpy as np
import onnx
import torch

from .. import onnxfile
from ..errors import EdgeAttnError, InvalidArgument, RuntimeUnavailable, first_line
from ..onnxfile import bodies, formats
from .base import REDUCED_PRECISION, Runtime, Session, Tolerance


class OrtSession(Session):
    def __init__(
        self, runtime: Runtime, path: Path, providers: list, device: str = "cpu", observe: Sequence[str] = ()
    ) -> None:
        import onnxruntime as ort

        self.runtime = runtime.name
        if formats.format_of(path) == "ort":  # already optimized, and not an ONNX protobuf: load as it is
            file = formats.header(path)
            runtime.check_file(file.metadata, path)
            if observe:
                raise EdgeAttnError(
                    f"{path}: an ORT-format file cannot return tensors inside its graph; check the "
                    f".onnx file it was converted from"
                )
            source, self.inputs, self.outputs = str(path), file.inputs, file.outputs
        else:
            model = onnxfile.read(path, weights=True)
            metadata = onnxfile.read_metadata(model)
            runtime.check_file(metadata, path)
            model = for_runtime(model, runtime, metadata)
            self.inputs, self.outputs = onnxfile.graph_inputs(model), onnxfile.graph_outputs(model)
            model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in observe)
            source = model.SerializeToString()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Denormals flushed to zero on onnxruntime's own threads (and on the calling thread while it runs, _run)
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        try:
            with flushed_denormals():  # the option also sets the creating thread's flags: restore them after
                self._session = ort.InferenceSession(source, options, providers=providers)
        except Exception as e:
            raise EdgeAttnError(f"{path}: onnxruntime could not load the model: {ort_error(e)}") from e
        wanted = wanted_provider(providers)
        if self._session.get_providers()[0] != wanted:  # ORT silently falls back to CPU otherwise
            raise RuntimeUnavailable(f"onnxruntime did not enable {wanted} (got {self._session.get_providers()})")
        self._names = [o.name for o in self.outputs] + list(observe)
        self._device = device

    def _run(self, feeds):
        try:
            with flushed_denormals():
                if self._device == "cpu":
                    return dict(zip(self._names, self._session.run(self._names, feeds)))
                return self._run_bound(feeds)
        except Exception as e:
            raise EdgeAttnError(f"onnxruntime ({self.runtime}) failed to run: {first_line(e)}") from e

    def _run_bound(self, feeds):
        """IO binding: inputs are copied to the device once and outputs allocated there, so ORT does not stage
        them through its own host buffers on every run; outputs come back to numpy at the end."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self._device, 0))
        for name in self._names:
            binding.bind_output(name, self._device, 0)
        self._session.run_with_iobinding(binding)
        return dict(zip(self._names, binding.copy_outputs_to_cpu()))


def wanted_provider(providers: list) -> str:
    """The name of the provider a session is asked for: the first of ``providers`` (a name, or (name, options))."""
    return providers[0][0] if isinstance(providers[0], tuple) else providers[0]


def ort_error(e: Exception) -> str:
    """What an onnxruntime error says failed: a provider's error (OpenVINO's, for one) stacks C++ source locations
    in its first lines and says what failed last, so: the last line that names no source location, else the
    first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    plain = [line for line in lines if not re.search(r"\.(cc|cpp|h):\d+", line) and not line.endswith(":")]
    return plain[-1] if plain else first_line(e)


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush denormals to zero on the calling thread (its FTZ and DAZ flags) for the duration, then restore them.

    Masked keys reach Softmax as -inf, and onnxruntime's exp turns each one into a denormal on its way to zero;
    on x86, denormal arithmetic is slow.  Flushing them on every thread that runs the session (onnxruntime's pool and
    the caller, which takes a share of each parallel loop) made masked models faster on onnxruntime with bitwise
    equal outputs (benchmarks/RESULTS.md, 2026-12-01 (second session), sliding-block against compiled
    FlexAttention).  Only values below 1.2e-38 can change.
    A no-op where the CPU has no such flags (torch.set_flush_denormal returns False)."""
    had = bool(np.float32(1e-39) * np.float32(1.0) == 0)  # what the thread does now
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(had)


def for_runtime(model: onnx.ModelProto, runtime: Runtime, meta: Optional[dict] = None) -> onnx.ModelProto:
    """Swap the bodies of the file's nodes for the ones ``runtime`` runs fastest (``Runtime.runs_as``), in memory
    (``meta``: the file's metadata, if already read)."""
    meta = onnxfile.read_metadata(model) if meta is None else meta
    requested = meta.get("lowering", "")
    return bodies.swap(
        model, lambda lowering, softcap: runtime.executes(lowering, requested, softcap), cast(int, meta.get("opset"))
    )  # every file edgeattn writes records its opset


class OrtCpu(Runtime):
    name = "ort-cpu"
    description = "onnxruntime, CPU execution provider"
    tolerances = {"fp32": Tolerance(atol=1e-4, min_cosine=0.99999), **REDUCED_PRECISION}
    file_formats = frozenset({"onnx", "ort"})
    refused_precisions = {
        "bf16": "onnxruntime's CPU provider has no bfloat16 kernels (Conv, MatMul...); run bf16 "
        "files on openvino-cpu or ort-cuda"
    }
    # Dense-table nodes of auto files run as the fused contrib MultiHeadAttention, faster on causal-block than the
    # MatMul/Add/Softmax body (benchmarks/RESULTS.md, 2026-11-30 (portable files ...): the cost of portability).
    runs_as = {"dense": "contrib", "attention": "contrib"}
    provider = "CPUExecutionProvider"
    install = "install it with: pip install 'edgeattn[ort]'"

    def machine_reasons(self) -> list[str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return [f"onnxruntime is not installed; {self.install}"]
        if self.provider not in ort.get_available_providers():
            return [
                f"{self.provider} is not among onnxruntime's providers {ort.get_available_providers()}; {self.install}"
            ]
        return []

    def _providers(self):
        return [self.provider]

    def _load(self, path, accuracy, module, observe=()):
        return OrtSession(self, path, self._providers(), observe=observe)


class OrtCuda(OrtCpu):
    name = "ort-cuda"
    description = "onnxruntime, CUDA execution provider"
    # TF32 is off below, so fp32 parity holds the CPU runtimes' 1e-4: kernels differ from the CPU in summation
    # order only (every registered model well inside it on an H200: benchmarks/RESULTS.md, 2026-11-30 (onnxruntime
    # CUDA, first run)).
    tolerances = {"fp32": Tolerance(atol=1e-4, min_cosine=0.9999), **REDUCED_PRECISION}
    refused_precisions = {}
    # Keeps the file's bodies: on CUDA, MultiHeadAttention was slower than the dense MatMul/Softmax body on every
    # sparse case and faster only on causal N=2048, and Attention-23 slower still (benchmarks/RESULTS.md, 2026-11-30
    # (onnxruntime CUDA, first run), what was chosen from these figures).
    runs_as = {}
    provider = "CUDAExecutionProvider"
    # the CUDA provider ships in the onnxruntime-gpu package only: the plain [ort] extra never has it
    install = "install it with: pip install 'edgeattn[ort-gpu]'"

    def _providers(self):
        # use_tf32 0: fp32 files compute in fp32 (TF32 matmuls would miss the fp32 tolerance); cuDNN picks conv
        # algorithms by measuring them once (EXHAUSTIVE) and the memory arena grows only by what is requested.
        return [
            (
                self.provider,
                {
                    "device_id": 0,
                    "use_tf32": 0,
                    "cudnn_conv_algo_search": "EXHAUSTIVE",
                    "arena_extend_strategy": "kSameAsRequested",
                    "do_copy_in_default_stream": 1,
                },
            ),
            "CPUExecutionProvider",
        ]

    def _load(self, path, accuracy, module, observe=()):
        return OrtSession(self, path, self._providers(), device="cuda", observe=observe)

    @functools.cache
    def machine_reasons(self) -> list[str]:
        # onnxruntime-gpu lists the CUDA EP even without a GPU or CUDA libraries; only a session tells.
        return super().machine_reasons() or started(self._providers())


def started(providers: list) -> list[str]:
    """Why a session on ``providers`` (the first the one wanted) does not start, from a one-node model; empty when
    it does.  Providers are listed by onnxruntime whether or not their device and libraries are there."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    wanted = wanted_provider(providers)
    try:  # CUDA and cuDNN from pip's nvidia-* packages ([ort-gpu]), where installed; the probe below tells
        ort.preload_dlls()
    except Exception:
        pass
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    # IR 8 / opset 13: any onnxruntime since 1.10 reads it (onnx's default IR can be newer than the runtime's)
    probe = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [x],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        ir_version=8,
        opset_imports=[helper.make_opsetid("", 13)],
    )
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=providers)
    except Exception as e:
        return [f"{wanted} could not start: {first_line(e)}"]
    if session.get_providers()[0] != wanted:
        return [f"{wanted} could not start (its device or libraries are missing)"]
    return []


# the package that brings each execution provider, for the message when the onnxruntime here lacks it
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",  # each of these replaces the onnxruntime package
    "DmlExecutionProvider": "onnxruntime-directml",
    "QNNExecutionProvider": "onnxruntime-qnn",
    "CoreMLExecutionProvider": "onnxruntime (macOS)",
}


class OrtProvider(OrtCpu):
    """``ort:<ExecutionProvider>[,key=value...]``: any provider the installed onnxruntime reports, with its provider
    options (onnxruntime falls back to the CPU provider for the nodes the provider does not take).  Files keep their
    bodies (no swap to the CPU provider's contrib ops); fp32 is held to the CPU runtimes' gate, so a provider that
    computes an fp32 file at a lower precision fails it and says by how much."""

    refused_precisions = {}
    runs_as = {}

    def __init__(self, provider: str, options: dict[str, str]) -> None:
        self.provider, self.options = provider, dict(options)
        self.name = "ort:" + ",".join([provider, *(f"{k}={v}" for k, v in options.items())])
        self.description = f"onnxruntime, {provider}"
        package = PROVIDER_PACKAGES.get(provider)
        self.install = f"it comes with the {package} package" if package else "see onnxruntime's list of providers"

    def _providers(self):
        return [(self.provider, self.options), "CPUExecutionProvider"]

    @functools.cache
    def machine_reasons(self) -> list[str]:
        return super().machine_reasons() or started(self._providers())


def provider_runtime(spec: str) -> Runtime:
    """The runtime named ``ort:<spec>``: ``Provider[,key=value...]``; ``CUDA`` is short for
    ``CUDAExecutionProvider``.  The plain CPU and CUDA providers are ``ort-cpu`` and ``ort-cuda``."""
    provider, *pairs = spec.split(",")
    if not provider:
        raise InvalidArgument("ort:<ExecutionProvider> needs a provider name, e.g. ort:OpenVINOExecutionProvider")
    if not provider.endswith("ExecutionProvider"):
        provider += "ExecutionProvider"
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise InvalidArgument(f"ort:{spec}: provider options are key=value, separated by commas; got {bad[0]!r}")
    options = dict(p.split("=", 1) for p in pairs)
    try:
        import onnxruntime as ort

        known = ort.get_all_providers()
    except ImportError:
        known = [provider]
    if provider not in known:
        raise InvalidArgument(f"ort:{spec}: onnxruntime has no provider {provider} (it knows {', '.join(known)})")
    if not options and provider == OrtCpu.provider:
        return OrtCpu()
    if not options and provider == OrtCuda.provider:
        return OrtCuda()
    return OrtProvider(provider, options)
