"""Reduced-precision files: fp16 / bf16 weights and compute, and int8 linear layers (onnxruntime quantization).

A file's inputs and outputs stay float32 whatever its precision: the graph casts them at its edges, so one feed dict
serves every file of a model (numpy has no bfloat16) and the cast costs nothing next to the model.

Masks cannot overflow: tables are boolean and become 0 / -inf in the compute dtype (both exact in fp16 and bf16, unlike
``finfo(float32).min``), Softmax runs in float32 inside every lowering, and a row with no allowed key is set to zeros
after it.  int8 quantizes only the linear layers (MatMul / Gemm with a weight initializer): attention stays in float,
as it is inside the ``edgeattn`` function bodies.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import EdgeAttnError, first_line

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZE = ("int8", "int8-static")
DEFAULT_CALIBRATION_SAMPLES = 16
# 7-bit weights: onnxruntime's x86 u8s8 kernels without VNNI (AVX2, AVX-512F) add pairs of products in int16 with
# saturation (VPMADDUBSW); full-range int8 weights overflow it.  On an AVX2-only CPU na2d-block int8 missed its cosine
# gate with 8-bit weights and met it with 7-bit (benchmarks/RESULTS.md, 2026-11-30 (architecture refactor ... and
# 7-bit int8 weights)).  A file must be right on every x86 CPU.
REDUCE_RANGE = True
# ONNX gave Conv, Pooling and others bfloat16 at opset 22; a bf16 file below it fails the checker on convolutions
DTYPE_MIN_OPSET = {"bf16": 22}
PRECISIONS = (*DTYPES, *QUANTIZE)  # what a file's metadata calls its precision


def default_opset(dtype: str, default: int) -> int:
    return max(default, DTYPE_MIN_OPSET.get(dtype, default))


def check_opset(dtype: str, opset: int) -> None:
    if opset < DTYPE_MIN_OPSET.get(dtype, 0):
        raise EdgeAttnError(
            f"{dtype} files need opset >= {DTYPE_MIN_OPSET[dtype]} (where ONNX Conv and other ops "
            f"accept bfloat16), got opset {opset}; pass --opset {DTYPE_MIN_OPSET[dtype]}"
        )


def precision_name(dtype: str, quantize: Optional[str]) -> str:
    """What a file's metadata and tolerance key call its precision: fp32, fp16, bf16, int8 or int8-static."""
    if dtype not in DTYPES:
        raise EdgeAttnError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if quantize is None:
        return dtype
    if quantize not in QUANTIZE:
        raise EdgeAttnError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
    if dtype != "fp32":
        raise EdgeAttnError(f"--quantize {quantize} quantizes an fp32 export; drop --dtype {dtype}")
    return quantize


class CastIO(nn.Module):
    """Runs ``module`` in ``dtype``: float inputs are cast in, float outputs cast back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *inputs):
        out = self.module(*(t.to(self.dtype) if t.is_floating_point() else t for t in inputs))
        return torch.utils._pytree.tree_map(lambda t: t.float() if t.is_floating_point() else t, out)


def name_prefix(dtype: str) -> str:
    """How the names of ``model``'s buffers start in the module :func:`in_dtype` returns."""
    return "" if dtype == "fp32" else "module."


def in_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``model`` computing in ``dtype`` with float32 inputs and outputs (``model`` itself for fp32)."""
    if dtype == "fp32":
        return model
    return CastIO(copy.deepcopy(model).to(DTYPES[dtype]), DTYPES[dtype]).eval()


def linear_nodes(model: onnx.ModelProto) -> list[str]:
    """Graph MatMul / Gemm nodes whose second input is a weight initializer: the model's linear layers."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


def quantize(src: Path, dst: Path, mode: str, calibration: Optional[Iterable[Mapping[str, np.ndarray]]] = None) -> int:
    """Quantize the linear layers of the fp32 file ``src`` into ``dst``; returns how many layers were quantized.

    ``int8``: dynamic quantization (int8 weights, activations quantized per run).  ``int8-static``: QDQ with
    activation ranges calibrated on ``calibration`` feeds (per-channel int8 weights, uint8 activations)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
    except ImportError:
        raise EdgeAttnError("--quantize needs onnxruntime; install it with: pip install 'edgeattn[ort]'") from None
    nodes = linear_nodes(onnx.load(str(src), load_external_data=False))
    if not nodes:
        raise EdgeAttnError(f"{src}: no linear layers (MatMul/Gemm with weights) to quantize")
    logging.disable(logging.WARNING)  # the quantizer logs advice about pre-processing on every call
    try:
        if mode == "int8":
            quantize_dynamic(
                str(src), str(dst), nodes_to_quantize=nodes, weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE
            )
        else:
            feeds = list(calibration or [])
            if not feeds:
                raise EdgeAttnError("int8-static quantization needs calibration inputs")

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._feeds = iter(feeds)

                def get_next(self):
                    return next(self._feeds, None)

            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                nodes_to_quantize=nodes,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=REDUCE_RANGE,
            )
    except EdgeAttnError:
        raise
    except Exception as e:
        raise EdgeAttnError(f"onnxruntime quantization failed: {first_line(e)}") from e
    finally:
        logging.disable(logging.NOTSET)
    return len(nodes)


def load_calibration(path, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an ``.npz`` file holding one array per model input, stacked on a leading axis
    (``np.savez(f, image=batch_of_images)``: sample i is ``image[i]``)."""
    path = Path(path)
    try:
        data = np.load(path)
    except Exception as e:
        raise EdgeAttnError(
            f"{path}: cannot read calibration data ({first_line(e)}); save it with "
            f"numpy.savez(path, {'=..., '.join(input_names)}=...)"
        ) from None
    missing = [n for n in input_names if n not in data.files]
    if missing:
        raise EdgeAttnError(f"{path}: calibration data lacks inputs {missing}; it has {data.files}")
    arrays = {n: data[n] for n in input_names}  # each data[n] reads and decompresses the array again
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise EdgeAttnError(f"{path}: calibration inputs have different sample counts {sorted(counts)}")
    return [{n: np.ascontiguousarray(a[i]) for n, a in arrays.items()} for i in range(counts.pop())]
