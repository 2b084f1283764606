import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeattn import runtimes

CPU_RUNTIMES = ["ort-cpu", "openvino-cpu"]
# lowering -> (opset, target runtimes) it is exported and checked with
LOWERING_CASES = {"dense": (18, None), "blocked": (18, None), "attention": (23, None), "contrib": (18, ["ort-cpu"])}
LOWERING_LIST = [(name, *case) for name, case in sorted(LOWERING_CASES.items())]
# Mask2Former thresholds sigmoid(mask logits) < 0.5: a logit within rounding of 0 can land on the other side on
# another runtime and move that query's outputs by ~1e-3 (see edgeattn/models/mask2former.py).  Measured on an
# AVX2-only CPU: 2.4e-3 on onnxruntime at batch 3, all in six queries of two images (a flipped decision cascading);
# 1e-5 on OpenVINO.  On an AVX-512 CPU: 6.5e-3 on OpenVINO from one decision of 1.6M flipped 3.6e-7 from its
# threshold (`edgeattn check` explains it: 8.1e-6 with that decision taken from OpenVINO).  Until the deployment
# matrix explains ties as parity does, the fp32 bound stays loose for this model only.
TIE_ATOL = {"mask2former-decoder": 1e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require(name: str):
    """Skip (with the runtime's own reason) when a runtime cannot run on this machine."""
    reasons = runtimes.get(name).not_supported_reasons()
    if reasons:
        pytest.skip(f"{name} unavailable: {'; '.join(reasons)}")


def external_data_file(folder):
    """A plain torch.onnx.export file whose weight lives in model.onnx.data beside it (the exporter's default)."""
    import onnx
    import torch

    model = torch.nn.Linear(512, 256).eval()   # large enough for the exporter to move its weight out
    path = folder / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 512),), str(path), dynamo=True, external_data=True, input_names=["x"])
    proto = onnx.load(str(path), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    return model, path


def relocate_external_data(path, location):
    """Point every external-data tensor of ``path`` at ``location``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


# The deployment matrix's onnx2tf columns (tests/test_deploy.py, marked onnx2tf) take tens of minutes of mostly
# single-threaded TensorFlow conversion.  With EDGEATTN_PARALLEL_ONNX2TF=1 (.ci/run) the session runs them as a
# second pytest process alongside the rest, and fails if they fail.
_ONNX2TF_LOG = Path(__file__).resolve().parents[1] / "onnx2tf-job.log"


def pytest_sessionstart(session):
    if os.environ.get("EDGEATTN_PARALLEL_ONNX2TF") == "1":
        env = {k: v for k, v in os.environ.items() if k != "EDGEATTN_PARALLEL_ONNX2TF"}
        session.config.onnx2tf_job = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-m", "onnx2tf", "-q", "-p", "no:cacheprovider",
             str(Path(__file__).with_name("test_deploy.py"))],
            stdout=_ONNX2TF_LOG.open("w"), stderr=subprocess.STDOUT, env=env)


def pytest_sessionfinish(session, exitstatus):
    job = getattr(session.config, "onnx2tf_job", None)
    if job is None:
        return
    code = job.wait()
    lines = _ONNX2TF_LOG.read_text().splitlines()
    said = [line for line in lines if line.startswith(("E  ", "FAILED", "ERROR"))][:40] + lines[-1:]
    print(f"\nonnx2tf job (pytest -m onnx2tf tests/test_deploy.py, log {_ONNX2TF_LOG.name}) exited {code}:\n"
          + "\n".join(said))
    if code != 0:
        session.exitstatus = 1
