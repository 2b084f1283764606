"""``edgeattn inspect FILE``: what an ONNX file or OpenVINO IR contains, read without running it (or loading
external weights).

ONNX: op types per domain, opsets, custom domains and their model-local functions, initializer bytes (inline and
external), the edgeattn mask-table bytes and metadata.  A default export shows no custom domain; a ``--custom-op``
one shows the ``edgeattn`` domain and its functions.  OpenVINO IR: op types (``opset::Type``), the .bin's bytes,
the rt_info ``runtime_options`` and the edgeattn metadata.

:func:`read_tables` reads the static mask tables back from an .onnx file, for ``inspect --plot``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from . import onnxfile
from .errors import BadFile
from .onnxfile import attention_lines, formats, mask_label
from .runtimes.openvino import plain_compile_note


def inspect_file(path) -> dict:
    info = _inspect(path)
    # what a plain OpenVINO compile computes the file in here, when below its precision (empty otherwise)
    info["openvino_note"] = plain_compile_note(info["metadata"].get("precision", "fp32"))
    return info


def _inspect(path) -> dict:
    kind = formats.format_of(path)
    if kind == "openvino":
        return _inspect_ir(Path(path))
    if kind != "onnx":
        raise BadFile(
            f"{path}: inspect reads .onnx and .xml files; inspect the .onnx this {kind} file was converted from"
        )
    model = onnxfile.read(path)
    ops = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in _all_nodes(model.graph))
    opsets = {op.domain or "ai.onnx": op.version for op in model.opset_import}
    inline_bytes, external_bytes, external_files = 0, 0, set()
    for tensor in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            external_bytes += int(info.get("length", 0))
            external_files.add(info.get("location", "?"))
        else:
            inline_bytes += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    meta = onnxfile.read_metadata(model)
    return {
        "file": str(path),
        "file_bytes": Path(path).stat().st_size,
        "ir_version": model.ir_version,
        "opsets": opsets,
        "custom_domains": sorted(d for d in opsets if d not in ("ai.onnx", "ai.onnx.ml")),
        "functions": sorted(f"{f.domain}::{f.name}" for f in model.functions),
        "ops": dict(sorted(ops.items())),
        "initializer_bytes": inline_bytes,
        "external_data_bytes": external_bytes,
        "external_data_files": sorted(external_files),
        "mask_table_bytes": meta.get("table_bytes"),
        "inputs": _io(onnxfile.graph_inputs(model)),
        "outputs": _io(onnxfile.graph_outputs(model)),
        "metadata": meta,
    }


def _io(infos) -> list[dict]:
    """Inputs or outputs as JSON: name, numpy dtype, shape (ints; names or "?" for symbolic axes)."""
    return [{"name": i.name, "dtype": str(i.dtype), "shape": list(i.shape)} for i in infos]


def read_tables(path) -> list[dict]:
    """The distinct static mask tables of an .onnx file from ``edgeattn.export_onnx``, read from its initializers by
    the names its ``masks`` metadata records for each attention node (kept when the nodes are inlined).

    One dict per distinct table: ``mask`` (label), ``layout``, ``nodes`` (the node names sharing it), ``q_len``,
    ``kv_len`` and ``arrays`` (role -> numpy array, roles as in ``onnxfile.TABLE_INPUTS``); nodes without a table in
    the file come grouped with ``arrays`` None and ``why``: a mask computed in the graph, or a file whose metadata
    predates the table names (re-export it)."""
    check_tables_readable(path)
    model = onnxfile.read(path)
    nodes = onnxfile.read_metadata(model).get("masks", [])
    if not nodes:
        raise BadFile(
            f"{path}: its metadata lists no edgeattn attention nodes (not a file from "
            f"edgeattn.export_onnx), so there are no tables to read"
        )
    initializers = {i.name: i for i in model.graph.initializer}
    folder = str(Path(path).resolve().parent)  # external data was checked to lie inside it by onnxfile.read
    found: dict = {}
    for node in nodes:
        names = node.get("tables") or {}
        why = _unreadable(node, names, initializers)
        key = (mask_label(node), why) if why else tuple(sorted(names.items()))
        if key not in found:
            arrays = (
                None
                if why
                else {role: onnx.numpy_helper.to_array(initializers[name], folder) for role, name in names.items()}
            )
            found[key] = {
                "mask": mask_label(node),
                "layout": node.get("layout"),
                "nodes": [],
                "q_len": node.get("q_len"),
                "kv_len": node.get("kv_len"),
                "arrays": arrays,
                "why": why,
            }
        found[key]["nodes"].append(node.get("node", "?"))
    return list(found.values())


def check_tables_readable(path) -> None:
    """Tables are initializers of .onnx files; an IR or ORT-format file is refused by its suffix, before any work."""
    if formats.format_of(path) != "onnx":
        raise BadFile(f"{path}: tables are read from .onnx files; use the .onnx this file was made from")


def _unreadable(node: dict, names: dict, initializers) -> str:
    """Why a node's table cannot be read from the file; empty when it can."""
    if not names:
        if node.get("table_bytes") == 0:
            return "mask computed in the graph: the file stores no table"
        return "the metadata does not name its table (written by an older edgeattn): re-export the file"
    missing = [name for name in names.values() if name not in initializers]
    return f"its table tensor {missing[0]!r} is not in the file" if missing else ""


def _inspect_ir(path: Path) -> dict:
    model = formats.read_ir(path)
    header = formats.ir_header(path, model)
    ops = Counter(f"{op.get_type_info().version_id}::{op.get_type_name()}" for op in model.get_ordered_ops())
    rt_info = model.get_rt_info()
    options = rt_info["runtime_options"] if "runtime_options" in rt_info else {}
    meta = header.metadata
    return {
        "file": str(path),
        "format": "openvino",
        "file_bytes": path.stat().st_size,
        "weights_bytes": path.with_suffix(".bin").stat().st_size,
        "ops": dict(sorted(ops.items())),
        "runtime_options": {k: v.astype(str) for k, v in options.items()},
        "mask_table_bytes": meta.get("table_bytes"),
        "inputs": _io(header.inputs),
        "outputs": _io(header.outputs),
        "metadata": meta,
    }


def format_report(info: dict) -> str:
    if info.get("format") == "openvino":
        lines = [
            f"{info['file']}: OpenVINO IR, {info['file_bytes'] / 1e6:.2f} MB + {info['weights_bytes'] / 1e6:.2f} "
            f"MB of weights (.bin)",
            "runtime_options: " + (", ".join(f"{k}={v}" for k, v in info["runtime_options"].items()) or "none"),
        ]
        return "\n".join(lines + _tail(info))
    lines = [
        f"{info['file']}: {info['file_bytes'] / 1e6:.2f} MB, IR {info['ir_version']}",
        "opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        "custom domains: " + (", ".join(info["custom_domains"]) or "none (standard ONNX ops only)"),
    ]
    if info["functions"]:
        lines.append("functions: " + ", ".join(info["functions"]))
    lines.append(
        f"initializers: {info['initializer_bytes'] / 1e6:.2f} MB in the file"
        + (
            f", {info['external_data_bytes'] / 1e6:.2f} MB in {', '.join(info['external_data_files'])}"
            if info["external_data_files"]
            else ""
        )
    )
    return "\n".join(lines + _tail(info))


def _tail(info: dict) -> list[str]:
    """Inputs and outputs, mask-table bytes, attention nodes, ops and metadata: the same for every format."""
    lines = [
        f"{kind}: " + ", ".join(f"{t['name']} {t['dtype']} [{', '.join(map(str, t['shape']))}]" for t in info[kind])
        for kind in ("inputs", "outputs")
    ]
    if info["mask_table_bytes"] is not None:
        lines.append(f"mask tables: {info['mask_table_bytes'] / 1e6:.2f} MB")
    if info["openvino_note"]:
        lines.append(f"OpenVINO: {info['openvino_note']}")
    nodes = info["metadata"].get("masks", [])
    if nodes:  # the same lines as `check`: each node's mask, lowering, why, and what a runtime swaps it for
        lines.append(f"attention nodes: {len(nodes)}")
        lines += attention_lines(nodes)
    lines.append("ops:")
    lines += [f"  {name:40s} {count}" for name, count in info["ops"].items()]
    meta = {k: v for k, v in info["metadata"].items() if k not in ("masks", "config")}
    if meta:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    return lines


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)
