"""OpenVINO CPU: ONNX files and OpenVINO IR (``.xml``).

Default exports hold standard ops only and OpenVINO reads them as they are.  OpenVINO has no conversion rule for
custom-domain nodes (it ignores model-local functions), so before it reads a ``--custom-op`` file each
``edgeattn`` attention node is prepared one of two ways:

- dense-table nodes (lowerings dense and attention) stay edgeattn nodes, and a ConversionExtension turns each one
  into OpenVINO's own ``ScaledDotProductAttention`` op, so each device plugin picks its attention kernel (the CPU
  plugin currently lowers it to the same fused MHA kernel it builds for the standard-op body);
- blocked-table nodes run edgeattn's fused kernel on the CPU device when the ``edgeattn-kernels`` package is
  installed (its OpenVINO extension converts them; ``EDGEATTN_KERNELS=0`` turns it off, ``=1`` makes it required);
- every other node (blocked tables otherwise; contrib, which OpenVINO cannot run; nodes that soft-cap their scores,
  which SDPA cannot) is inlined into its standard-op function body.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
import onnx.inliner

from .. import onnxfile
from ..errors import EdgeAttnError, ExportFailed, InvalidArgument, first_line
from ..onnxfile import DOMAIN, formats
from .base import REDUCED_PRECISION, Runtime, Session, Tolerance

_BIAS = onnxfile.bias_position("dense")  # dense-table node inputs: q, k, v, mask, then the optional bias


class OpenVinoSession(Session):
    fused_sdpa: int  # how many edgeattn nodes became OpenVINO ScaledDotProductAttention ops
    fused_kernel: int  # how many ran edgeattn's fused kernel (edgeattn-kernels); the rest were inlined

    def __init__(
        self, runtime: Runtime, path: Path, device: str, accuracy: bool = False, observe: Sequence[str] = ()
    ) -> None:
        import openvino as ov

        self.runtime = runtime.name
        core = ov.Core()
        is_ir = formats.format_of(path) == "openvino"
        if is_ir:  # an IR is read once, here; an ONNX file is converted below
            ov_model = formats.read_ir(path, core)
            file = formats.ir_header(path, ov_model)
            metadata, self.inputs, self.outputs = file.metadata, file.inputs, file.outputs
        else:
            model = onnxfile.read(path, weights=True)
            metadata = onnxfile.read_metadata(model)
            self.inputs, self.outputs = onnxfile.graph_inputs(model), onnxfile.graph_outputs(model)
        runtime.check_file(metadata, path)
        try:
            if not is_ir:
                ov_model = to_openvino(model, runtime, core, kernel_extension(device))
            if observe:  # extra results, after the file's outputs
                ov_model.add_outputs(list(observe))
            ops = [op.get_type_name() for op in ov_model.get_ordered_ops()]
            self.fused_sdpa = ops.count("ScaledDotProductAttention")
            self.fused_kernel = ops.count("MaskedAttention")
            self.config = _config(core, device, metadata.get("precision", "fp32"), accuracy)
            self._compiled = core.compile_model(ov_model, device, self.config)
        except EdgeAttnError as e:  # the same kind of error, naming the file
            raise type(e)(f"{path}: {e}") from e
        except Exception as e:
            raise EdgeAttnError(f"{path}: OpenVINO could not compile the model: {ov_error(e)}") from e
        self._ports = [self._compiled.output(i) for i in range(len(self.outputs) + len(observe))]
        self._names = [info.name for info in self.outputs] + list(observe)
        self._local = threading.local()  # an infer request is not thread-safe: one per calling thread

    def _run(self, feeds):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            results = request.infer(feeds, share_inputs=True)  # the arrays are not touched while it runs
        except Exception as e:
            raise EdgeAttnError(f"OpenVINO ({self.runtime}) failed to run: {ov_error(e)}") from e
        return {name: results[port].copy() for name, port in zip(self._names, self._ports)}


# the inference precision a file of each precision runs at when the device can (OPTIMIZATION_CAPABILITIES)
_INFERENCE_PRECISION = {"fp16": ("f16", "FP16"), "bf16": ("bf16", "BF16")}


def _config(core, device: str, precision: str, accuracy: bool) -> dict:
    """Compile options.  Parity runs (``accuracy``) ask for ACCURACY mode: no precision lowered below the file's.
    Otherwise fp16/bf16 files run at their precision where the device supports it, and everything else in f32
    (on CPUs with bf16 OpenVINO would by default run fp32 files in bf16 too)."""
    if accuracy:
        return {"EXECUTION_MODE_HINT": "ACCURACY"}
    hint, capability = _INFERENCE_PRECISION.get(precision, ("f32", "FP32"))
    try:  # a virtual device (AUTO:..., HETERO:...) answers for the first device it names
        capabilities = core.get_property(devices(device)[0], "OPTIMIZATION_CAPABILITIES")
    except Exception:
        capabilities = []
    if capability not in capabilities:
        hint = "f32"
    return {"INFERENCE_PRECISION_HINT": hint}


def plain_compile_note(precision: str = "fp32", device: str = "CPU") -> str:
    """What a plain ``core.compile_model(model, device)`` computes a file of ``precision`` in on this machine, when
    that is below the file's: OpenVINO's CPU plugin runs fp32 models in bf16 on CPUs that have it, and no IR setting
    changes that (its rt_info runtime_options do not carry the precision hint, and per-node DisablePrecisionConversion
    marks are lost when the plugin fuses MatMuls: tried with OpenVINO 2026.4).  Empty otherwise."""
    try:
        import openvino as ov

        hint = ov.Core().get_property(device, "INFERENCE_PRECISION_HINT").to_string()  # f32, bf16, f16
    except Exception:
        return ""
    if precision != "fp32" or hint == "f32":
        return ""
    return (
        f"a plain compile_model(model, {device!r}) computes this fp32 file in {hint} on this machine (OpenVINO's "
        f"default here); pass {{'INFERENCE_PRECISION_HINT': 'f32'}} to compile_model, or set it on the Core, to "
        "compute in f32 (edgeattn.load does)"
    )


def devices(device: str) -> list[str]:
    """The devices a device name stands for: ``HETERO:GPU,CPU`` -> GPU, CPU; ``BATCH:GPU(4)`` -> GPU; ``AUTO``,
    ``GPU.1`` -> themselves."""
    virtual, _, listed = device.partition(":")
    return [d.split("(")[0] for d in listed.split(",") if d] if listed else [virtual]


def _converts_to_sdpa(node: onnx.NodeProto, runtime: Runtime) -> bool:
    attributes = onnxfile.attributes(node)
    softcap = onnxfile.softcap(node) > 0  # SDPA has no softcap: executes() keeps such nodes' bodies
    return (
        attributes.get("layout") == "dense"
        and runtime.executes(attributes.get("lowering", ""), softcap=softcap) == "sdpa"
    )


def kernel_extension(device: str) -> Optional[Path]:
    """The OpenVINO extension of edgeattn-kernels when it is installed, runs on ``device`` (the CPU) and is not
    turned off (``EDGEATTN_KERNELS=0``); ``EDGEATTN_KERNELS=1`` makes its absence an error."""
    wanted = os.environ.get("EDGEATTN_KERNELS", "auto")
    if wanted not in ("auto", "0", "1"):
        raise InvalidArgument(f"EDGEATTN_KERNELS is {wanted!r}; use 0 (off), 1 (required) or leave it unset")
    if wanted == "0" or device != "CPU":
        return None
    try:
        import edgeattn_kernels

        return edgeattn_kernels.openvino_library()
    except (ImportError, RuntimeError) as e:
        if wanted == "1":
            detail = "edgeattn-kernels is not installed" if isinstance(e, ImportError) else first_line(e)
            raise EdgeAttnError(f"EDGEATTN_KERNELS=1 but {detail}; see the docs page Native kernels") from e
        return None


def to_openvino(model: onnx.ModelProto, runtime: Runtime, core=None, kernel: Optional[Path] = None):
    """The ``openvino.Model`` of an edgeattn ONNX model: dense-table attention nodes become OpenVINO's
    ScaledDotProductAttention, blocked-table nodes the fused kernel of the extension ``kernel`` when given, every
    other attention node its standard-op body (a default file has none left)."""
    import openvino as ov
    from openvino.frontend.onnx import ConversionExtension

    core = core or ov.Core()
    if kernel is not None and any(_runs_kernel(n) for n in onnxfile.attention_nodes(model)):
        core.add_extension(str(kernel))  # converts the blocked-table nodes kept below
    model = _inline_all_but_kept(model, runtime, kernel is not None)
    errors = []

    def convert(context):  # OpenVINO reports a converter's exception inside a long log: keep it to report
        try:
            return to_sdpa(context)
        except Exception as e:
            errors.append(e)
            raise

    for name in sorted({n.op_type for n in onnxfile.attention_nodes(model) if not _runs_kernel(n)}):
        core.add_extension(ConversionExtension(name, DOMAIN, convert))  # only applies to later reads
    try:
        return core.read_model(model.SerializeToString(), b"")
    except Exception as e:
        if errors:
            raise ExportFailed(
                f"OpenVINO could not convert {DOMAIN} attention to ScaledDotProductAttention: {first_line(errors[0])}"
            ) from errors[0]
        raise EdgeAttnError(f"OpenVINO could not read the model: {ov_error(e)}") from e


def ov_error(e: Exception) -> str:
    """OpenVINO's exceptions stack C++ source locations ("Exception from src/...cpp:117:", "Check '...' failed at
    src/...cpp:34:") above the line that says what failed: return that line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("edgeattn::")]  # the fused kernel's own message
    if ours:
        return ours[-1]
    located = [line for line in lines if not line.startswith("Exception from")]
    said = [line for line in located if not (line.startswith("Check '") and line.endswith(":"))]
    return (said or located or lines or [repr(e)])[0]


def _runs_kernel(node: onnx.NodeProto) -> bool:
    return onnxfile.attributes(node).get("layout") == "blocked"


def _inline_all_but_kept(model: onnx.ModelProto, runtime: Runtime, kernel: bool) -> onnx.ModelProto:
    """Inline the function bodies of the edgeattn nodes no extension converts.

    Each body is its own op type and function: dropping the functions of the converted nodes leaves exactly those
    nodes in place when the inliner expands the rest."""
    nodes = onnxfile.attention_nodes(model)
    kept = {n.op_type for n in nodes if _converts_to_sdpa(n, runtime) or (kernel and _runs_kernel(n))}
    if all(n.op_type in kept for n in nodes):
        return model
    functions = [f for f in model.functions if not (f.domain == DOMAIN and f.name in kept)]
    del model.functions[:]
    model.functions.extend(functions)
    return onnx.inliner.inline_local_functions(model)


def to_sdpa(context):
    """ConversionExtension body: one dense-table ``MaskedAttention`` node -> ``ScaledDotProductAttention``.

    q, k, v (B, H, N, D); mask bool (H or 1, Nq, Nkv), True = attend, as SDPA takes it; optional float bias."""
    import openvino.opset13 as ops  # the newest opset with SDPA; later opsets do not redefine it

    layout = context.get_attribute("layout")
    if layout != "dense":
        raise ExportFailed(
            f"only dense-table nodes convert to ScaledDotProductAttention, this one has layout {layout!r}"
        )
    if context.get_attribute("softcap", 0.0):
        raise ExportFailed("a node that soft-caps its scores cannot become ScaledDotProductAttention (no softcap)")
    q, k, v, mask = (context.get_input(i) for i in range(_BIAS))

    def like_q(value):  # constants in q's element type, which SDPA requires for scale and a float mask
        return ops.convert_like(ops.constant(np.array(value, np.float32)), q)

    # An absent optional input is not a shorter input list: it arrives as the output of a "NullNode".
    has_bias = context.get_input_size() > _BIAS and context.get_input(_BIAS).get_node().get_type_name() != "NullNode"
    attn_mask = mask
    if has_bias:  # SDPA has one mask input, added to the scores when float: bias where allowed, -inf elsewhere
        attn_mask = ops.select(mask, ops.convert_like(context.get_input(_BIAS), q), like_q(-np.inf))
    out = ops.scaled_dot_product_attention(q, k, v, attn_mask, like_q(context.get_attribute("scale")), causal=False)
    # SDPA gives NaN on a query row with no allowed key, edgeattn gives zeros; a constant mask without such rows
    # (the usual case: tables are initializers) needs no Select.
    source = mask.get_node()
    if source.get_type_name() == "Constant" and source.get_data().any(axis=-1).all():
        return [out.output(0)]
    row_any = ops.reduce_logical_or(mask, np.array([-1], np.int64), keep_dims=True)
    return [ops.select(row_any, out, like_q(0.0)).output(0)]


class OpenVinoCpu(Runtime):
    name = "openvino-cpu"
    description = "OpenVINO, CPU plugin"
    tolerances = {"fp32": Tolerance(atol=1e-4, min_cosine=0.99999), **REDUCED_PRECISION}
    lowerings = frozenset({"dense", "blocked", "attention", "routed", "routed_dense"})  # contrib is onnxruntime's
    file_formats = frozenset({"onnx", "openvino"})
    # every dense-table node becomes OpenVINO's ScaledDotProductAttention (see the module docstring)
    runs_as = {"dense": "sdpa", "attention": "sdpa"}
    runs_as_always = True
    device = "CPU"

    @functools.cache
    def machine_reasons(self) -> list[str]:
        try:
            import openvino as ov
        except ImportError:
            return ["openvino is not installed; install it with: pip install 'edgeattn[openvino]'"]
        have = ov.Core().available_devices
        wanted = [d for d in devices(self.device) if d not in VIRTUAL_DEVICES]
        missing = [d for d in wanted if not any(h == d or h.split(".")[0] == d for h in have)]
        if missing:
            return [
                f"OpenVINO here has no {', '.join(missing)} device (it has {', '.join(have) or 'none'}); a GPU or "
                "NPU needs its driver installed"
            ]
        return []

    def _load(self, path, accuracy, module, observe=()):
        return OpenVinoSession(self, path, self.device, accuracy, observe)


# devices that stand for others: they run wherever those run
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


class OpenVinoDevice(OpenVinoCpu):
    """``openvino:<DEVICE>``: any device OpenVINO names (CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU, HETERO:GPU,CPU).
    fp32 files are compiled in f32 and held to the CPU's gate, so a device that computes them lower fails it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.name = f"openvino:{device}"
        self.description = f"OpenVINO, {device} device"


def device_runtime(device: str) -> Runtime:
    """The runtime named ``openvino:<device>`` (``openvino:CPU`` is ``openvino-cpu``)."""
    if not device or device.endswith(":"):
        raise InvalidArgument(f"openvino:{device}: name a device, e.g. openvino:CPU, openvino:GPU, openvino:AUTO")
    return OpenVinoCpu() if device == "CPU" else OpenVinoDevice(device)
