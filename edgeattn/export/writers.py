"""An exported ONNX model -> the deployment formats: OpenVINO IR and onnxruntime's ORT format.

- **OpenVINO IR** (``.xml`` + ``.bin``): built from the custom-op form, so each dense-table attention becomes
  OpenVINO's ``ScaledDotProductAttention`` and each blocked one its standard ops (see
  :mod:`edgeattn.runtimes.openvino`).  Weights keep the file's precision (no FP16 compression, unlike ``ovc``'s
  default); fp32 files record ``INFERENCE_PRECISION_HINT f32`` under ``runtime_options`` in the model's rt_info,
  and the ``edgeattn.*`` metadata goes in its ``edgeattn`` section.
- **ORT format** (``.ort``): onnxruntime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``,
  fixed optimizations), with the ``<name>.required_operators.config`` a minimal onnxruntime build is made from.

Both are written beside the target and moved in when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .. import runtimes
from ..errors import ExportFailed, RuntimeUnavailable, first_line
from ..files import publish, staging
from ..onnxfile import formats
from ..runtimes.openvino import ov_error, to_openvino
from .quiet import quiet

# what a plain compile_model of an IR should run at, per file precision (others: the device's choice, as before)
IR_RUNTIME_OPTIONS = {"fp32": {"INFERENCE_PRECISION_HINT": "f32"}}


def write_openvino_ir(proto: onnx.ModelProto, path, metadata: dict) -> int:
    """Convert an edgeattn ONNX model (any form) to IR at ``path`` (.xml, its .bin beside it); returns bytes
    written."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("writing OpenVINO IR needs openvino: pip install 'edgeattn[openvino]'") from None
    path = Path(path)
    model = to_openvino(proto, runtimes.get("openvino-cpu"))
    for key, value in IR_RUNTIME_OPTIONS.get(metadata.get("precision", "fp32"), {}).items():
        model.set_rt_info(value, ["runtime_options", key])
    formats.write_ir_metadata(model, metadata)
    with staging(path) as folder:
        xml = folder / path.name
        try:
            ov.save_model(model, str(xml), compress_to_fp16=False)
        except Exception as e:
            raise ExportFailed(f"{path}: OpenVINO could not save the model: {ov_error(e)}") from e
        return publish([(xml.with_suffix(".bin"), path.with_suffix(".bin")), (xml, path)])


def write_ort_format(proto: onnx.ModelProto, path) -> int:
    """Convert an ONNX model to the ORT format at ``path`` (.ort) with its required-operators config beside it;
    returns bytes written."""
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError:
        raise RuntimeUnavailable("writing the ORT format needs onnxruntime: pip install 'edgeattn[ort]'") from None
    path = Path(path)
    config = path.with_name(f"{path.stem}.required_operators.config")
    with staging(path) as folder:
        source = folder / f"{path.stem}.onnx"
        onnx.save(proto, str(source))
        chatty = logging.getLogger("ort_format_model.utils")  # logs each config it writes at INFO, on stderr
        level = chatty.level
        chatty.setLevel(logging.WARNING)
        try:
            with quiet():
                convert_onnx_models_to_ort(
                    source, output_dir=folder / "out", optimization_styles=[OptimizationStyle.Fixed]
                )
        except Exception as e:
            raise ExportFailed(
                f"{path}: onnxruntime could not convert the model to the ORT format: {first_line(e)}"
            ) from e
        finally:
            chatty.setLevel(level)
        out = folder / "out"
        written = out / f"{path.stem}.ort"
        if not written.is_file():
            raise ExportFailed(
                f"{path}: onnxruntime's ORT-format converter wrote no model; run `python -m "
                f"onnxruntime.tools.convert_onnx_models_to_ort` on the .onnx to see why"
            )
        return publish([(out / config.name, config), (written, path)])
