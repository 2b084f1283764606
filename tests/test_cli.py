import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeattn import load, runtimes
from edgeattn.cli import main

from conftest import CPU_RUNTIMES


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def nat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "nat.onnx"
    assert main(["export", "nat-tiny", "-o", str(path)]) == 0
    return path


def test_lists(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "nat-tiny" in out and "swin-tiny-block" in out
    code, out, _ = run_cli(capsys, "masks")
    assert code == 0 and all(f in out for f in ("neighborhood", "window", "segments", "sinks"))
    code, out, _ = run_cli(capsys, "runtimes")
    assert code == 0 and "ort-cpu" in out and "openvino-cpu" in out


def test_export_with_check_prints_both_cpu_runtimes(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "export", "nat-tiny", "-o", tmp_path / "n.onnx", "--check", "--runs", "2", "--json", tmp_path / "r.json"
    )
    assert code == 0, out + err
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("runtime")) + 1 :]
    rows = {line.split()[0]: line.split()[1] for line in table if line.strip()}
    assert rows == {"torch": "ok", "ort-cpu": "ok", "openvino-cpu": "ok"}
    assert "mask tables" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["runtime"] for r in report} == {"torch", *CPU_RUNTIMES}
    for r in report:
        assert {"runtime", "max_abs_err", "cosine", "p50_ms", "ok"} <= set(r) and r["ok"] is True


def test_check_on_inline_swin(capsys, tmp_path):
    path = tmp_path / "swin.onnx"
    assert run_cli(capsys, "export", "swin-tiny-block", "-o", path, "--inline")[0] == 0
    code, out, _ = run_cli(capsys, "check", path, "--runtime", "openvino-cpu", "--runs", "1")
    assert code == 0 and "openvino-cpu  ok" in out and "(standard ops)" in out
    # --inline, kept for old scripts, writes exactly the default file
    assert run_cli(capsys, "export", "swin-tiny-block", "-o", tmp_path / "default.onnx")[0] == 0
    assert (tmp_path / "default.onnx").read_bytes() == path.read_bytes()


def test_openvino_ir_and_ort_format_export_check_bench_inspect(capsys, tmp_path):
    import openvino as ov

    xml, ort_file = tmp_path / "sw.xml", tmp_path / "sw.ort"
    code, out, err = run_cli(
        capsys, "export", "swin-tiny-block", "-o", xml, "--lowering", "dense", "--check", "--runs", "1"
    )
    assert code == 0 and (tmp_path / "sw.bin").is_file() and "(openvino format) for openvino-cpu" in out
    assert [line.split()[:2] for line in out.splitlines()[-2:]] == [["torch", "ok"], ["openvino-cpu", "ok"]]
    model = ov.Core().read_model(str(xml))
    assert model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"
    ops = {op.get_type_name() for op in model.get_ordered_ops()}
    assert "ScaledDotProductAttention" in ops and "Softmax" not in ops  # dense-table attention is OpenVINO's SDPA
    code, out, _ = run_cli(capsys, "inspect", xml)
    assert code == 0 and "runtime_options: INFERENCE_PRECISION_HINT=f32" in out and "opset13::ScaledDotProduct" in out
    assert re.search(r"\ninputs: \w+ float32 \[1, \d+, \d+\]\noutputs: \w+ float32 \[1, ", out), out
    code, out, _ = run_cli(capsys, "export", "swin-tiny-block", "-o", ort_file, "--format", "ort")
    assert code == 0 and (tmp_path / "sw.required_operators.config").read_text().strip()
    code, out, _ = run_cli(capsys, "check", ort_file, "--runs", "1")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[-2:]] == [["torch", "ok"], ["ort-cpu", "ok"]]
    assert load(xml).runtime == "openvino-cpu" and load(ort_file).runtime == "ort-cpu"  # auto goes by the format
    code, out, _ = run_cli(capsys, "bench", xml, "--runs", "1")
    assert code == 0 and [r.split()[:3] for r in out.splitlines()[1:]] == [
        ["torch", "eager", "-"],
        ["openvino-cpu", "dense", "openvino"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sw.bin",
        "sw.ort",
        "sw.required_operators.config",
        "sw.xml",
    ]  # nothing staged is left behind
    code, out, _ = run_cli(capsys, "check", ort_file, "--runtime", "openvino-cpu", "--runs", "1")
    assert code == 1 and "openvino-cpu does not load ort files" in out


def test_check_fails_with_numbers_when_the_file_is_off(capsys, nat_file, tmp_path):
    model = onnx.load(nat_file)
    weight = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, tampered)
    code, out, err = run_cli(capsys, "check", tampered, "--runtime", "ort-cpu", "--runs", "1")
    assert code == 1
    assert "ort-cpu  fail" in out and "parity gate FAILED on: ort-cpu" in err


# bad command lines and a part of the message each refusal must have (test_error_family.py runs them too)
BAD_ARGUMENTS = [
    (["export", "resnet", "-o", "x.onnx"], "unknown model 'resnet'"),
    (["check", "missing.onnx"], "missing.onnx: no such file"),
    (["check", "README.md"], "README.md: not an ONNX model"),
    (["export", "nat-tiny", "-o", "x.onnx", "--opset", "9"], "opset must be an integer in [17, 25]"),
    (["check", "x.onnx", "--runtime", "tpu"], "unknown runtime 'tpu'"),
    (["export", "nat-tiny", "-o", "x.onnx", "--opset", "26"], "opset must be an integer in [17, 25]"),
    (["export", "nat-tiny", "-o", "x.onnx", "--json", "r.json"], "add --check"),
    (["export", "nat-tiny", "-o", "x.onnx", "--seed", "-1"], "seed must be an integer in [0, 2**63)"),
    (["export", "nat-tiny", "-o", "."], "is a directory"),
    (["check", "README.md", "--json", "."], "is a directory"),
    (["export", "nat-tiny", "-o", "x.onnx", "--format", "openvino"], "needs the suffix .xml"),
    (["export", "nat-tiny", "-o", "x.xml", "--runtime", "ort-cpu"], "runs on openvino-cpu only"),
    (
        ["export", "nat-tiny", "-o", "x.ort", "--lowering", "attention", "--opset", "23", "--runtime", "openvino-cpu"],
        "runs on ort-cpu, ort-cuda only",
    ),
    (["check", "nope.xml"], "no such file"),
    (["inspect", "x.ort"], "inspect reads .onnx and .xml"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("edgeattn: error: ") and message in err and err.count("\n") == 1


def test_runs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "x.onnx", "--runs", "0"])
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_unavailable_runtime_exits_2(capsys, nat_file):
    if runtimes.get("ort-cuda").is_available():
        pytest.skip("CUDA EP available here")
    code, _, err = run_cli(capsys, "check", nat_file, "--runtime", "ort-cuda")
    assert code == 2 and "runtime ort-cuda is not available" in err


@pytest.fixture(scope="module")
def py_file(tmp_path_factory):
    """A file exported from Python: no registered model in its metadata, a dynamic batch."""
    from edgeattn import export_onnx, masks
    from edgeattn.layers import MaskedSelfAttention

    layer = MaskedSelfAttention(32, 2, masks.causal(), seq_len=20).eval()
    path = tmp_path_factory.mktemp("py") / "py.onnx"
    export_onnx(layer, [torch.randn(2, 20, 32)], path, input_names=["x"], output_names=["y"], dynamic_batch=True)
    return path


def _rows(out):
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("runtime")) + 1 :]
    return {line.split()[0]: line.split()[1:] for line in table if line.strip() and not line.startswith(" ")}


def test_check_compares_the_runtimes_of_a_file_exported_from_python(capsys, py_file, tmp_path):
    code, out, err = run_cli(capsys, "check", py_file, "--runs", "1", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    assert "no PyTorch reference: runtimes compared with ort-cpu" in out and "causal x1: dense" in out
    rows = _rows(out)
    assert list(rows) == CPU_RUNTIMES and all(r[0] == "ok" for r in rows.values())
    assert rows["ort-cpu"][4] == "reference" and rows["openvino-cpu"][4].startswith("abs")
    assert [r["tolerance"] for r in json.loads((tmp_path / "r.json").read_text())][0] == "reference"
    code, out, _ = run_cli(capsys, "check", py_file, "--runtime", "openvino-cpu", "--runs", "1")
    assert code == 0 and "no other runtime to compare with: openvino-cpu only ran it" in out


def test_check_feeds_given_inputs(capsys, py_file, tmp_path):
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(1).standard_normal((3, 20, 32), dtype=np.float32))
    code, out, err = run_cli(capsys, "check", py_file, "--runs", "1", "--inputs", tmp_path / "good.npz")
    assert code == 0 and list(_rows(out)) == CPU_RUNTIMES, out + err
    # NaN in an input: the runtimes agree on where it spreads, so the check passes and says the input had NaN
    x = np.ones((1, 20, 32), np.float32)
    x[0, 5, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    code, out, err = run_cli(capsys, "check", py_file, "--runs", "1", "--inputs", tmp_path / "nan.npz")
    assert code == 0 and "openvino-cpu: inputs with NaN/inf: x" in out, out + err


# bad --inputs for py_file's input x (float32 (batch, 20, 32)); None: a file that is not an .npz
BAD_FEEDS = [
    ({"y": np.zeros((1, 20, 32), np.float32)}, "missing ['x'], unexpected ['y']"),
    ({"x": np.zeros((1, 20, 32), np.float32), "z": np.zeros(1)}, "unexpected ['z']"),
    ({"x": np.zeros((1, 20, 32))}, "input 'x': expected dtype float32, got float64"),
    ({"x": np.zeros((1, 21, 32), np.float32)}, "input 'x': expected shape ('batch', 20, 32), got (1, 21, 32)"),
    (None, "not an .npz archive; save them with numpy.savez(path, x=...)"),
]


def write_feeds(path, arrays):
    """An .npz of ``arrays`` at ``path`` for --inputs, or a file that is not one for None."""
    if arrays is None:
        path.write_text("not numpy")
    else:
        np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", BAD_FEEDS)
def test_check_bad_inputs_is_one_line_and_exit_2(capsys, py_file, tmp_path, arrays, message):
    path = write_feeds(tmp_path / "in.npz", arrays)
    code, out, err = run_cli(capsys, "check", py_file, "--inputs", path)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_check_fails_when_runtimes_disagree(capsys, py_file, tmp_path):
    """Seeded random numbers are a real disagreement: onnxruntime and OpenVINO draw them with other generators."""
    model = onnx.load(py_file)
    for node in model.graph.node:
        node.output[:] = ["y_raw" if o == "y" else o for o in node.output]
    model.graph.node.extend(
        [
            onnx.helper.make_node("RandomUniformLike", ["y_raw"], ["noise"], seed=1.0),
            onnx.helper.make_node("Add", ["y_raw", "noise"], ["y"]),
        ]
    )
    noisy = tmp_path / "noisy.onnx"
    onnx.save(model, noisy)
    code, out, err = run_cli(capsys, "check", noisy, "--runs", "1")
    assert code == 1 and _rows(out)["ort-cpu"][0] == "ok" and _rows(out)["openvino-cpu"][0] == "fail"
    assert "parity gate FAILED on: openvino-cpu" in err


def test_check_without_a_registered_model_cannot_run_torch(capsys, tmp_path, nat_file):
    model = onnx.load(nat_file)
    keep = [p for p in model.metadata_props if p.key != "edgeattn.model"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    path = tmp_path / "anon.onnx"
    onnx.save(model, path)
    code, _, err = run_cli(capsys, "check", path, "--runtime", "torch")
    assert code == 2 and "torch has no model to run" in err and "parity.compare_model" in err


def test_check_feeds_given_inputs_to_the_registered_model_too(capsys, nat_file, tmp_path):
    image = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    image[0, 0, 0, 0] = np.inf  # shows in the torch row's note: the reference ran the given inputs
    np.savez(tmp_path / "in.npz", image=image)
    code, out, err = run_cli(
        capsys, "check", nat_file, "--runtime", "torch", "--runs", "1", "--inputs", tmp_path / "in.npz"
    )
    assert code == 0 and "torch: inputs with NaN/inf: image" in out, out + err
    code, out, err = run_cli(capsys, "check", nat_file, "--runtime", "torch", "--inputs", tmp_path / "nope.npz")
    assert code == 2 and "nope.npz: no such file" in err


def test_inspect_text_shows_each_attention_node(capsys, py_file):
    code, out, _ = run_cli(capsys, "inspect", py_file)
    assert code == 0 and "attention nodes: 1" in out
    assert "\n  causal x1: dense (" in out  # mask, lowering, then why
    # the names to give converters (onnx2tf -kat), with the dynamic batch as a named axis
    assert "\ninputs: x float32 [batch, 20, 32]\noutputs: y float32 [batch, 20, 32]\n" in out, out


def test_inspect_and_check_say_what_a_plain_openvino_compile_computes_in(capsys, nat_file, tmp_path):
    """On a CPU with bf16, OpenVINO's CPU plugin runs fp32 files in bf16 unless told: both commands say so there,
    and neither says it where a plain compile computes in f32."""
    import openvino as ov

    plain = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    code, out, _ = run_cli(capsys, "inspect", nat_file, "--json", tmp_path / "i.json")
    said = f"OpenVINO: a plain compile_model(model, 'CPU') computes this fp32 file in {plain} on this machine"
    assert code == 0 and (said in out) == (plain != "f32"), out
    assert json.loads((tmp_path / "i.json").read_text())["openvino_note"].startswith("a plain") == (plain != "f32")
    code, out, _ = run_cli(capsys, "check", nat_file, "--runtime", "openvino-cpu", "--runs", "1")
    assert code == 0 and (said in out) == (plain != "f32"), out
    code, out, _ = run_cli(capsys, "check", nat_file, "--runtime", "ort-cpu", "--runs", "1")
    assert "OpenVINO:" not in out  # OpenVINO did not run it


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "edgeattn", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("edgeattn ")


def test_export_lowering_and_targets(capsys, tmp_path):
    path = tmp_path / "sw.onnx"
    code, _, err = run_cli(
        capsys,
        "export",
        "swin-tiny-block",
        "-o",
        path,
        "--lowering",
        "contrib",
        "--runtime",
        "ort-cpu",
        "--check",
        "--runs",
        "1",
    )
    assert code == 0 and "(contrib)" in err
    code, out, _ = run_cli(capsys, "check", path, "--runtime", "ort-cpu", "--runs", "1")
    assert (
        code == 0
        and "lowering contrib -> contrib (standard ops) for ort-cpu" in out
        and "window_7 x1: contrib (requested)" in out
    )
    code, out, err = run_cli(capsys, "export", "swin-tiny-block", "-o", path, "--lowering", "contrib")
    assert code == 2
    assert err.startswith("edgeattn: error: the contrib lowering runs on ort-cpu, ort-cuda only, not on openvino-cpu")
    assert "use --lowering auto, dense or blocked" in err and err.count("\n") == 1 and out == "", err


def test_bench_model_writes_table_json_markdown_and_plot(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        "bench",
        "na2d-block",
        "--lowering",
        "auto",
        "--lowering",
        "contrib",
        "--runs",
        "1",
        "--json",
        tmp_path / "b.json",
        "--markdown",
        tmp_path / "b.md",
        "--plot",
        tmp_path / "b.png",
    )
    assert code == 0, out + err
    header, *rows = out.splitlines()
    assert header.split() == [
        "runtime",
        "lowering",
        "form",
        "precision",
        "status",
        "size_MB",
        "tables_MB",
        "export_s",
        "max_abs_err",
        "cosine",
        "p50_ms",
        "p90_ms",
        "speedup",
    ]
    table = {tuple(r.split()[:3]): r.split()[4] for r in rows}
    # both forms side by side on each runtime: the default (standard ops) and --custom-op
    assert table == {
        ("torch", "eager", "-"): "ok",
        **{
            (rt, "auto:blocked", form): "ok" for rt in ("ort-cpu", "openvino-cpu") for form in ("standard", "custom-op")
        },
        ("ort-cpu", "contrib", "standard"): "ok",
        ("openvino-cpu", "contrib", "standard"): "n/a",
        ("ort-cpu", "contrib", "custom-op"): "ok",
        ("openvino-cpu", "contrib", "custom-op"): "n/a",
    }
    assert "9/9" in err  # the progress bar counts torch + 2 lowerings x 2 forms x 2 runtimes
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["lowering"] for r in report][:2] == ["eager", "auto:blocked"]
    assert all(r["max_abs_err"] < 1e-5 for r in report if r["status"] == "ok")
    assert (tmp_path / "b.md").read_text().startswith("| runtime | lowering |")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_file_keeps_its_lowering(capsys, nat_file):
    code, out, _ = run_cli(capsys, "bench", nat_file, "--runtime", "ort-cpu", "--runs", "1")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [tuple(r[:5]) for r in rows] == [
        ("torch", "eager", "-", "fp32", "ok"),
        ("ort-cpu", "auto:blocked", "standard", "fp32", "ok"),
    ]


# bad bench and lowering arguments
BAD_BENCH_ARGUMENTS = [
    (["bench", "nope"], "neither a registered model"),
    (["bench", "na2d-block", "--json", "."], "is a directory"),
    (["export", "nat-tiny", "-o", "x.onnx", "--lowering", "attention"], "needs opset >= 23"),
]


@pytest.mark.parametrize("argv, message", BAD_BENCH_ARGUMENTS)
def test_bench_and_lowering_bad_input(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_check_defaults_to_the_runtimes_a_file_is_for(capsys, tmp_path):
    path = tmp_path / "c.onnx"
    assert (
        run_cli(capsys, "export", "swin-tiny-block", "-o", path, "--lowering", "contrib", "--runtime", "ort-cpu")[0]
        == 0
    )
    code, out, _ = run_cli(capsys, "check", path, "--runs", "1")
    assert code == 0 and "openvino-cpu" not in out.split("runtime", 1)[1] and "ort-cpu  ok" in out


def test_export_dynamic_batch_reference_model(capsys, tmp_path):
    import numpy as np
    import torch

    from edgeattn import models

    path = tmp_path / "nat.onnx"
    assert run_cli(capsys, "export", "nat-tiny", "-o", path, "--dynamic-batch")[0] == 0
    built = models.build("nat-tiny")
    image = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want = built.module(image).numpy()
    for name in CPU_RUNTIMES:
        got = runtimes.load(path, name).run({"image": image.numpy()})["logits"]
        np.testing.assert_allclose(got, want, atol=1e-4)
