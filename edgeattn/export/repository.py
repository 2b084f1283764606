"""An exported model -> a model server's repository folder, the portable files only (no edgeattn on the server):

- **Triton** (``triton``): ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.onnx`` (onnxruntime backend), or
  ``1/model.xml`` + ``1/model.bin`` (openvino backend, for files targeting ``openvino-cpu`` only).  The config names
  every input and output with its data type and dims; a file whose inputs and outputs all have a symbolic first
  axis (``--dynamic-batch``) gets ``max_batch_size`` and ``dynamic_batching``, its dims then exclude that axis.
- **OpenVINO Model Server** (``ovms``): ``REPO/<name>/1/model.xml`` + ``.bin`` and ``REPO/config.json`` with the
  model in ``model_config_list`` (``base_path`` relative to ``config.json``; other models there are kept).

``<name>/`` is built in a folder beside it and moved in when complete, so a failure leaves the old one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from .. import onnxfile
from ..errors import EdgeAttnError
from ..files import atomic_write
from . import writers

MAX_BATCH_SIZE = 16  # what Triton's dynamic batcher may gather; the file itself takes any batch
# KServe v2's tensor datatypes (Triton, OVMS and `edgeattn serve` speak that protocol)
DATATYPES = {
    np.dtype(t): name
    for t, name in [
        (np.float32, "FP32"),
        (np.float16, "FP16"),
        (np.float64, "FP64"),
        (np.int64, "INT64"),
        (np.int32, "INT32"),
        (np.int8, "INT8"),
        (np.uint8, "UINT8"),
        (np.bool_, "BOOL"),
    ]
}
TRITON_TYPES = {dtype: f"TYPE_{name}" for dtype, name in DATATYPES.items()}  # KServe v2's names, prefixed


def batchable(inputs: Sequence[onnxfile.TensorInfo], outputs: Sequence[onnxfile.TensorInfo]) -> bool:
    """Requests may be concatenated on axis 0 when every input and output has a symbolic first axis."""
    return all(t.shape and isinstance(t.shape[0], str) for t in [*inputs, *outputs])


def model_name(metadata: Mapping) -> str:
    """The repository name of a model: its registered name (or ``model``) with only letters, digits, ``_.-``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(metadata.get("model") or "model")).strip("._-")
    return name or "model"


def check_folder(path, kind: str) -> Path:
    """Fail early, in one line, when ``path`` cannot be or become a ``kind`` (triton, ovms) repository folder."""
    if not str(path).strip():
        raise EdgeAttnError("output path is empty")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgeAttnError(f"{path}: is a file; a repository is a folder: give a folder path such as models/")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeAttnError(f"{path}: no permission to write in {parent}")
    if kind == "ovms" and path.is_dir():
        _ovms_config(path / "config.json")  # refuse an unreadable config.json before the export
    return path


def write_repository(
    kind: str, proto: onnx.ModelProto, folder, metadata: dict, file_format: str, name: Optional[str] = None
) -> tuple[Path, int]:
    """Write ``proto`` into the ``kind`` (triton, ovms) repository at ``folder`` as ``file_format`` (onnx or
    openvino); returns the model file written and the bytes of the repository's new files."""
    folder = check_folder(folder, kind)
    name = name or model_name(metadata)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        model_file = stage / name / "1" / ("model.xml" if file_format == "openvino" else "model.onnx")
        model_file.parent.mkdir(parents=True)
        if file_format == "openvino":
            writers.write_openvino_ir(proto, model_file, metadata)
        else:
            onnxfile.save(proto, model_file)
        if kind == "triton":
            config = triton_config(name, file_format, onnxfile.graph_inputs(proto), onnxfile.graph_outputs(proto))
            atomic_write(stage / name / "config.pbtxt", config.encode())
        written = sum(f.stat().st_size for f in (stage / name).rglob("*") if f.is_file())
        target = folder / name
        if target.exists():  # a folder cannot replace a non-empty one: move the old one into the stage first
            os.replace(target, stage / "old")
        os.replace(stage / name, target)
    except OSError as e:
        raise EdgeAttnError(f"{folder / name}: cannot write: {e.strerror or e}") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if kind == "ovms":
        written += write_ovms_config(folder / "config.json", name)
    return target / "1" / model_file.name, written


def triton_config(
    name: str, file_format: str, inputs: Sequence[onnxfile.TensorInfo], outputs: Sequence[onnxfile.TensorInfo]
) -> str:
    """Triton's ``config.pbtxt`` (protobuf text of ``inference.ModelConfig``) for a model file of ``file_format``."""
    tensors = [*inputs, *outputs]
    batched = batchable(inputs, outputs)
    unsupported = sorted({str(t.dtype) for t in tensors if t.dtype not in TRITON_TYPES})
    if unsupported:
        raise EdgeAttnError(f"Triton has no data type for {', '.join(unsupported)} inputs or outputs")

    def tensor(t: onnxfile.TensorInfo) -> str:
        dims = [-1 if isinstance(d, str) else d for d in (t.shape[1:] if batched else t.shape)]
        shape = f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ]\n    reshape { shape: [ ] }"
        return f"  {{\n    name: {json.dumps(t.name)}\n    data_type: {TRITON_TYPES[t.dtype]}\n    {shape}\n  }}"

    lines = [
        f"name: {json.dumps(name)}",
        'backend: "openvino"\ndefault_model_filename: "model.xml"'
        if file_format == "openvino"
        else 'platform: "onnxruntime_onnx"',
        f"max_batch_size: {MAX_BATCH_SIZE if batched else 0}",
        "input [\n" + ",\n".join(map(tensor, inputs)) + "\n]",
        "output [\n" + ",\n".join(map(tensor, outputs)) + "\n]",
    ]
    if batched:
        lines.append("dynamic_batching { }")
    lines.append("instance_group [ { kind: KIND_CPU, count: 1 } ]")
    return "\n".join(lines) + "\n"


def write_ovms_config(path: Path, name: str) -> int:
    """Add (or replace) ``name`` in OpenVINO Model Server's ``config.json`` at ``path``, keeping the rest of it;
    returns bytes written."""
    config = _ovms_config(path)
    entries = [e for e in config["model_config_list"] if e.get("config", {}).get("name") != name]
    config["model_config_list"] = [*entries, {"config": {"name": name, "base_path": name}}]
    return atomic_write(path, (json.dumps(config, indent=2) + "\n").encode())


def _ovms_config(path: Path) -> dict:
    """An existing OVMS ``config.json`` (none: an empty ``model_config_list``), or one clear error."""
    if not path.exists():
        return {"model_config_list": []}
    try:
        config = json.loads(path.read_text())
        if not isinstance(config.setdefault("model_config_list", []), list) or not all(
            isinstance(e, dict) for e in config["model_config_list"]
        ):
            raise ValueError("model_config_list is not a list of objects")
        return config
    except (OSError, ValueError, AttributeError) as e:
        raise EdgeAttnError(f"{path}: not an OpenVINO Model Server config ({e}); fix it or move it away") from None
