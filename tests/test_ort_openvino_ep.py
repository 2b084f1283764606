"""onnxruntime's OpenVINOExecutionProvider through ``--runtime ort:OpenVINOExecutionProvider[,options]``.

The provider ships in the onnxruntime-openvino package, which replaces onnxruntime, so it lives in a venv of its
own: ``$EDGEATTN_ORT_OPENVINO_VENV``, default ``.venv-ort-openvino`` at the repository root (``python3 -m venv
.venv-ort-openvino && .venv-ort-openvino/bin/pip install onnxruntime-openvino``; .ci/run builds it).  The test links
the running venv's packages and this checkout into it with a ``.pth`` file, read after the venv's own packages, so
its onnxruntime wins; edgeattn runs there as ``python -m edgeattn``.  Without the venv the tests skip, except in CI.
"""

import json
import os
import site
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("EDGEATTN_ORT_OPENVINO_VENV", ROOT / ".venv-ort-openvino"))
PROVIDER = "ort:OpenVINOExecutionProvider,device_type=CPU"


@pytest.fixture(scope="module")
def python():
    python = VENV / "bin" / "python"
    if not python.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{python} is missing: build it with `python3 -m venv {VENV} && {VENV}/bin/pip install "
                        "onnxruntime-openvino` (.ci/run does)")  # fmt: skip
        pytest.skip(f"no onnxruntime-openvino venv at {VENV} (see this module's docstring)")
    packages = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(packages) / "edgeattn-main.pth").write_text(f"{site.getsitepackages()[0]}\n{ROOT}\n")
    return str(python)


def edgeattn(python, *argv, cwd):
    done = subprocess.run([python, "-m", "edgeattn", *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_the_provider_is_listed_and_its_onnxruntime_wins(python, tmp_path):
    code, out, err = edgeattn(python, "runtimes", "--json", tmp_path / "r.json", cwd=tmp_path)
    assert code == 0, err
    listed = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert listed["ort:OpenVINOExecutionProvider"]["available"], listed
    assert "ort:OpenVINOExecutionProvider" in out


def test_conformance_and_check_on_the_openvino_provider(python, tmp_path, registered_file):
    code, out, err = edgeattn(
        python, "conformance", "--runtime", PROVIDER, "--dtype", "fp32", "--dtype", "fp16", "--json",
        tmp_path / "c.json", cwd=tmp_path,
    )  # fmt: skip
    rows = json.loads((tmp_path / "c.json").read_text())
    assert code == 0, out + err
    assert {r["runtime"] for r in rows} == {PROVIDER}
    # the provider takes the opset-23 Attention node and its OpenVINO (2025.4 in onnxruntime-openvino 1.24) cannot
    # read it; contrib nodes, onnxruntime's own ops, it leaves to the CPU provider, and they run
    refused = {r["probe"]: r["detail"] for r in rows if r["status"] != "ok"}
    assert list(refused) == ["lowering-attention"], refused
    assert refused["lowering-attention"].endswith(
        "onnxruntime could not load the model: OpenVINO does not support the following ONNX operations: Attention"
    )
    code, out, err = edgeattn(python, "check", registered_file("nat-tiny"), "--runtime", PROVIDER, "--runs", "2",
                              cwd=tmp_path)  # fmt: skip
    assert code == 0, out + err
    assert any(line.split()[:2] == [PROVIDER, "ok"] for line in out.splitlines()), out
