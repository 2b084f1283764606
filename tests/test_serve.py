"""`edgeattn serve`: a real Ray Serve deployment on 127.0.0.1 under a bounded load.  Every answer is compared with
plain onnxruntime run on the same feeds, bad requests get one-line errors while the server keeps serving, and Ctrl-C
stops it without leaving Ray's processes behind."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeattn import export_onnx, masks
from edgeattn.cli import main
from edgeattn.layers import MaskedSelfAttention
from edgeattn.onnxfile import TensorInfo
from edgeattn.serve import BadRequest, infer_body, load_test, metadata, outputs_of, parse_request, post

LOAD_SECONDS = 20
CLIENTS = 8
INPUTS = [TensorInfo("x", ("batch", 64, 32), np.dtype(np.float32))]
OUTPUTS = [TensorInfo("y", ("batch", 64, 32), np.dtype(np.float32))]


def _request(**change) -> bytes:
    item = {"name": "x", "shape": [1, 64, 32], "datatype": "FP32", "data": [0.5] * (64 * 32), **change}
    return json.dumps({"inputs": [item]}).encode()


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not JSON"),
    (b'{"inputs": 3}', '"inputs" list'),
    (_request(shape=[1, 64, 31]), "shape [1, 64, 31], the model takes [-1, 64, 32]"),
    (_request(datatype="FP64"), "datatype 'FP64', the model takes FP32"),
    (_request(name="y"), "unexpected input 'y'"),
    (_request(data=[1.0, 2.0]), "2 values for shape [1, 64, 32]"),
    (_request(data=["a"] * 2048), "not a list of FP32 numbers"),
    (b'{"inputs": []}', "missing input 'x'"),
])
def test_bad_requests_are_one_line_each(body, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body, INPUTS, OUTPUTS)


def test_a_request_round_trips_exactly():
    x = np.random.default_rng(0).standard_normal((2, 64, 32)).astype(np.float32)
    feeds, names, _ = parse_request(infer_body({"x": x}), INPUTS, OUTPUTS)
    assert names == ["y"] and feeds["x"].dtype == np.float32 and np.array_equal(feeds["x"], x)
    assert metadata("m", "onnxruntime_onnx", INPUTS, OUTPUTS)["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 64, 32]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["--replicas", "64"], "--replicas 64 needs 64 CPUs"),
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'"),
])
def test_serve_refuses_bad_options_before_starting(tmp_path, capsys, argv, message):
    path = tmp_path / "m.onnx"
    torch.manual_seed(0)
    export_onnx(MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(8, 8)).eval(), [torch.randn(1, 64, 32)], path)
    assert main(["serve", str(path), "--port", str(_free_port()), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_serve_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx" in capsys.readouterr().err


def _ray_processes(tmpdir: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if tmpdir.encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


def test_served_model_under_load_answers_every_request_like_a_direct_run(tmp_path):
    torch.manual_seed(0)
    layer = MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(8, 8)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(layer, [torch.randn(1, 64, 32)], path, dynamic_batch=True)
    direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1 + i % 2, 64, 32)).astype(np.float32)} for i in range(12)]
    expected = [direct.run(None, r)[0] for r in requests]
    out = direct.get_outputs()[0].name

    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ea", dir="/tmp")   # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "edgeattn", "serve", str(path), "--port", str(port),
                             "--replicas", "2", "--max-batch-size", "8", "--name", "nbr"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving nbr"):
                break
        assert lines and lines[-1].startswith("serving nbr on ort-cpu (2 replicas"), "".join(lines)
        base = f"http://127.0.0.1:{port}/v2/models/nbr"
        import urllib.request
        with urllib.request.urlopen(base, timeout=30) as r:
            assert json.loads(r.read())["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64, 32]}]

        report = load_test(f"{base}/infer", requests, clients=CLIENTS, seconds=LOAD_SECONDS)
        print(f"\n{CLIENTS} clients, {LOAD_SECONDS} s, 2 replicas: {report.describe()}")
        assert report.sent == len(report.answers) > CLIENTS and not report.failed, report.failed[:3]
        worst = max(float(np.abs(outputs[out] - expected[i]).max()) for i, outputs, _ in report.answers)
        print(f"largest difference from a direct onnxruntime run: {worst:.1e}")
        assert worst <= 1e-6

        bad = [(_request(shape=[1, 64, 31]), 400, "the model takes [-1, 64, 32]"),
               (_request(datatype="INT64"), 400, "the model takes FP32"),
               (b'{"inputs": []}', 400, "missing input 'x'"),
               (b"{", 400, "not JSON")]
        for body, want, message in bad:
            status, answer = post(f"{base}/infer", body)
            assert status == want and message in answer["error"], answer
        status, answer = post(f"http://127.0.0.1:{port}/v2/models/other/infer", infer_body(requests[0]))
        assert status == 404 and "POST /v2/models/nbr/infer" in answer["error"]
        status, answer = post(f"{base}/infer", infer_body(requests[3]))    # and it still serves
        assert status == 200 and np.abs(outputs_of(answer)[out] - expected[3]).max() <= 1e-6

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip().endswith("stopped"), out
        assert _ray_processes(ray_tmp) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
