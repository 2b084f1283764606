"""Files from elsewhere: every bad file gets one EdgeAttnError from load (each runtime), inspect and check; never
another exception, never a read outside the model's folder."""

import os
import shutil

import onnx
import pytest
import torch

import edgeattn
from edgeattn import EdgeAttnError, export_onnx, masks
from edgeattn.cli import main
from edgeattn.inspection import inspect_file
from edgeattn.layers import MaskedSelfAttention
from edgeattn.onnxfile import OLDEST_OP_VERSION, OP_VERSION

from conftest import CPU_RUNTIMES, external_data_file, relocate_external_data


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    path = folder / "m.onnx"
    export_onnx(layer, [torch.randn(1, 36, 16)], path, input_names=["x"], output_names=["y"], custom_op=True)
    return path


def bad_files(good, folder):
    """(label, path, expected message) for each kind of bad file."""
    data = good.read_bytes()
    out = []

    def write(name, blob):
        p = folder / name
        p.write_bytes(blob)
        return p

    out.append(("text", write("text.onnx", b"hello, not a model\n" * 20), "not an ONNX model"))
    out.append(("empty", write("empty.onnx", b""), "not an ONNX model"))
    for i, cut in enumerate((1, 10, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1)):
        out.append((f"truncated@{cut}", write(f"trunc{i}.onnx", data[:cut]), "not an ONNX model"))
    # flipped bytes: refused when the structure breaks; inside tensor data the file stays a valid model with other
    # weights (only a parity check can tell), so for those either outcome is fine, but never another exception
    for i, at in enumerate((0, 4, 20, 64, 300, 1000, len(data) // 2, len(data) - 500, len(data) - 40, len(data) - 8)):
        flipped = data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]
        out.append((f"corrupted@{at}", write(f"flip{i}.onnx", flipped), None))
    out.append(("missing", folder / "nope.onnx", "no such file"))
    out.append(("directory", folder, "no such file"))

    for version, name, message in (
        (OP_VERSION + 1, "future", "upgrade edgeattn"),
        (OLDEST_OP_VERSION - 1, "past", "written by an older edgeattn"),
    ):
        other = onnx.load(str(good))
        for op in other.opset_import:
            if op.domain == "edgeattn":
                op.version = version
        onnx.save(other, str(folder / f"{name}.onnx"))
        out.append((f"edgeattn op version {version}", folder / f"{name}.onnx", message))

    secret = folder.parent / f"{folder.name}-secret.data"
    secret.write_bytes(b"\0" * 600_000)
    for label, location in (
        ("absolute location", str(secret)),
        ("'..' location", f"../{secret.name}"),
        ("missing data file", "gone.data"),
        ("symlink out", "link.data"),
    ):
        sub = folder / label.replace(" ", "_").replace("'", "")
        sub.mkdir()
        _, path = external_data_file(sub)
        if label == "symlink out":
            os.symlink(secret, sub / "link.data")
        relocate_external_data(path, location)
        out.append((label, path, "not a file inside"))
    return out


def test_bad_files_get_one_clear_error_everywhere(good, tmp_path, capsys):
    cases = bad_files(good, tmp_path)
    tried = refused = 0
    for label, path, message in cases:
        for attempt in [lambda r=r: edgeattn.load(path, r) for r in CPU_RUNTIMES] + [lambda: inspect_file(path)]:
            tried += 1
            try:
                attempt()
            except EdgeAttnError as e:
                refused += 1
                assert message is None or message in str(e), (label, str(e))
                assert "\n" not in str(e)
            else:
                assert message is None, f"{label}: loaded"
        for command in ("check", "inspect"):
            tried += 1
            code = main([command, str(path)])
            out, err = capsys.readouterr()
            if message is not None or code == 2:
                refused += 1
                assert code == 2 and err.startswith("edgeattn: error: ") and err.count("\n") == 1, (label, err)
                assert message is None or message in err, (label, err)
    assert len(cases) >= 25 and tried >= 125 and refused >= 100


def test_inspect_a_default_file_shows_only_standard_ops(good, tmp_path, capsys):
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    path = tmp_path / "standard.onnx"
    export_onnx(layer, [torch.randn(1, 36, 16)], path, input_names=["x"])
    info = inspect_file(path)
    assert info["custom_domains"] == [] and not info["functions"]
    assert all(op.startswith("ai.onnx::") for op in info["ops"])
    assert info["mask_table_bytes"] == layer.table.table_bytes
    custom = inspect_file(good)
    assert custom["custom_domains"] == ["edgeattn"] and custom["ops"]["edgeattn::MaskedAttention_blocked"] == 1
    assert main(["inspect", str(path), "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "custom domains: none (standard ONNX ops only)" in out and (tmp_path / "i.json").is_file()


def test_external_data_inside_the_folder_is_fine(tmp_path):
    _, path = external_data_file(tmp_path)
    assert inspect_file(path)["external_data_files"] == ["model.onnx.data"]
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    edgeattn.load(moved / "model.onnx", "ort-cpu")  # the pair travels together
