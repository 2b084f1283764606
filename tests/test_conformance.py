"""``edgeattn conformance``: every probe on the CPU runtimes, the files it keeps, and a runtime that computes below
fp32 caught by a probe."""

import json

import pytest

from edgeattn import conformance
from edgeattn.cli import main
from edgeattn.runtimes import openvino


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conformance")
    code = main(
        ["conformance", "--runtime", "ort-cpu", "--runtime", "openvino-cpu", "-o", str(folder / "probes"), "--json",
         str(folder / "probes.json")]
    )  # fmt: skip
    return code, folder


def test_every_probe_is_right_or_refused_with_a_reason(probed):
    code, folder = probed
    rows = json.loads((folder / "probes.json").read_text())
    assert code == 0
    assert {r["probe"] for r in rows} == {p.name for p in conformance.PROBES}
    assert {r["runtime"] for r in rows} == {"ort-cpu", "openvino-cpu"}
    refused = {(r["probe"], r["runtime"]): r["detail"] for r in rows if r["status"] == "refused"}
    # what each runtime cannot run: bf16 on onnxruntime's CPU provider, the contrib lowering on OpenVINO
    assert set(refused) == {("inf-mask-bf16", "ort-cpu"), ("lowering-contrib", "openvino-cpu")}
    assert (
        "bfloat16" in refused["inf-mask-bf16", "ort-cpu"] and "contrib" in refused["lowering-contrib", "openvino-cpu"]
    )
    assert all(r["status"] == "ok" for r in rows if (r["probe"], r["runtime"]) not in refused)


def test_a_kept_probe_file_checks_elsewhere_like_any_export(probed, capsys):
    _, folder = probed
    capsys.readouterr()
    assert main(["check", str(folder / "probes" / "fully-masked-row.onnx"), "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "model probe-attention" in out and "causal_empty_rows" in out


def test_a_runtime_computing_an_fp32_file_in_bf16_is_wrong(monkeypatch, tmp_path, capsys):
    """OpenVINO compiled as a plain compile_model does it (no precision hint): on a CPU with bf16 the precision probe
    catches it."""
    note = openvino.plain_compile_note()
    if not note:
        pytest.skip("OpenVINO computes fp32 files in f32 here by default")
    monkeypatch.setattr(openvino, "_config", lambda core, device, precision, accuracy: {})
    code = main(["conformance", "--runtime", "openvino-cpu", "--dtype", "fp32", "--json", str(tmp_path / "r.json")])
    rows = {r["probe"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert code == 1
    assert rows["fp32-computed-in-fp32"]["status"] == "wrong"
    assert rows["fp32-computed-in-fp32"]["max_abs_err"] > 1e-3  # bf16 keeps 8 bits of 10 +- 1
    assert "conformance: wrong results: " in capsys.readouterr().err


def test_bad_arguments_are_one_line(capsys, tmp_path):
    assert main(["conformance", "--runtime", "openvino:NPU"]) == 2
    assert "runtime openvino:NPU is not available" in capsys.readouterr().err
    assert main(["conformance", "--runtime", "litert"]) == 2
    assert "no runtime to probe" in capsys.readouterr().err


@pytest.mark.gpu
def test_every_probe_on_the_cuda_provider(tmp_path):
    from conftest import require

    require("ort-cuda")
    code = main(["conformance", "--runtime", "ort-cuda", "--runtime", "ort:CUDA,use_tf32=0", "--json",
                 str(tmp_path / "cuda.json")])  # fmt: skip
    rows = json.loads((tmp_path / "cuda.json").read_text())
    assert code == 0 and {r["probe"] for r in rows} == {p.name for p in conformance.PROBES}
    assert not [r for r in rows if r["status"] == "wrong"]  # refused ones (a lowering, a precision) say why
