"""torch -> ONNX.  One job per module:

- :mod:`.request`: what an export is asked for, validated once (precision, opset, lowering, target runtimes);
- :mod:`.plan`: which body each attention node gets, chosen once before tracing;
- :mod:`.exporter`: tracing with the dynamo exporter, quantization, the atomic save;
- :mod:`.graph`: the traced graph -> the file (bodies, deduplicated tables, metadata, inlining, checker);
- :mod:`.precision`: fp16/bf16 copies and int8 quantization;
- :mod:`.writers`: the OpenVINO IR and ORT-format files;
- :mod:`.repository`: Triton and OVMS model repositories;
- :mod:`.lm`: a transformers causal LM as prefill and decode-step files.

The registered-model workflow of ``edgeattn export`` (build, export, check) is :mod:`edgeattn.registered`, above
the models.

The file format itself (node signature, bodies, metadata, reading and writing) is :mod:`edgeattn.onnxfile`.
"""

from .exporter import ExportResult, export_checked, export_onnx
from .lm import export_lm
from .request import DEFAULT_OPSET, LOWERING_CHOICES, OPSETS, ExportRequest, check_request

__all__ = [
    "DEFAULT_OPSET",
    "LOWERING_CHOICES",
    "OPSETS",
    "ExportRequest",
    "ExportResult",
    "check_request",
    "export_checked",
    "export_lm",
    "export_onnx",
]
