"""`edgeattn serve`: a real Ray Serve deployment on 127.0.0.1 under a bounded load.  Every answer is compared with
plain onnxruntime run on the same feeds, Triton's own HTTP client works against it, bad requests get one-line errors
while the server keeps serving, and Ctrl-C stops it without leaving Ray's processes behind."""

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
from edgeattn.serve import BadRequest, infer_request, load_test, metadata, parse_request, post, response

# threads, signals and servers: these run one after another on one xdist worker (docs/getting-started.md)
pytestmark = pytest.mark.xdist_group("serial")

tritonclient_http = pytest.importorskip("tritonclient.http")  # in the test extra: Triton's own HTTP client

LOAD_SECONDS = 8
CLIENTS = 8
INPUTS = [TensorInfo("x", ("batch", 64, 32), np.dtype(np.float32))]
OUTPUTS = [TensorInfo("y", ("batch", 64, 32), np.dtype(np.float32))]


def _request(**change) -> bytes:
    item = {"name": "x", "shape": [1, 64, 32], "datatype": "FP32", "data": [0.5] * (64 * 32), **change}
    return json.dumps({"inputs": [item]}).encode()


def _binary(size: int, extra: bytes = b"") -> tuple[bytes, str]:
    head = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 64, 32], "datatype": "FP32", "parameters": {"binary_data_size": size}}]}
    ).encode()
    return head + bytes(size) + extra, str(len(head))


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not JSON"),
        (b'{"inputs": 3}', '"inputs" list'),
        (_request(shape=[1, 64, 31]), "shape [1, 64, 31], the model takes [-1, 64, 32]"),
        (_request(datatype="FP64"), "datatype 'FP64', the model takes FP32"),
        (_request(name="y"), "unexpected input 'y'"),
        (_request(data=[1.0, 2.0]), "2 values for shape [1, 64, 32]"),
        (_request(data=["a"] * 2048), "not a list of FP32 numbers"),
        (b'{"inputs": []}', "missing input 'x'"),
    ],
)
def test_bad_requests_are_one_line_each(body, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body, INPUTS, OUTPUTS)


def test_a_batch_above_the_cap_and_a_body_that_breaks_the_parser_are_refused():
    """A request of 64 rows on a server whose --max-batch-size is 8 (Triton refuses one above max_batch_size), JSON
    nested past Python's recursion limit, a shape whose size overflows int64, parameters that are not an object:
    400s, never a 500."""
    many = _request(shape=[64, 64, 32], data=[0.5] * (64 * 64 * 32))
    with pytest.raises(BadRequest, match="a batch of 64 is above this server's --max-batch-size 8"):
        parse_request(many, INPUTS, OUTPUTS, max_batch_size=8)
    assert parse_request(many, INPUTS, OUTPUTS).feeds["x"].shape == (64, 64, 32)  # no cap: taken
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_request(b"[" * 100_000 + b"]" * 100_000, INPUTS, OUTPUTS)
    with pytest.raises(
        BadRequest, match=r"1 values for shape \[4611686018427387904, 64, 32\] \(9444732965739290427392\)"
    ):
        parse_request(_request(shape=[2**62, 64, 32], data=[0.5]), INPUTS, OUTPUTS)
    with pytest.raises(BadRequest, match="could not be read: AttributeError"):
        parse_request(_request(parameters=[1]), INPUTS, OUTPUTS)


@pytest.mark.parametrize(
    "body,length,message",
    [
        (*_binary(8192)[:1], "99999", "does not fit"),
        (*_binary(4096), "binary_data_size 4096, shape [1, 64, 32] of FP32 takes 8192 bytes"),
        (*_binary(8192, b"xx"), "2 bytes of binary data after the inputs"),
    ],
)
def test_bad_binary_requests_are_one_line_each(body, length, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body, INPUTS, OUTPUTS, length)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_request_round_trips_exactly(binary):
    x = np.random.default_rng(0).standard_normal((2, 64, 32)).astype(np.float32)
    body, headers = infer_request({"x": x}, binary)
    request = parse_request(body, INPUTS, OUTPUTS, headers.get("Inference-Header-Content-Length"))
    assert request.outputs == {"y": binary} and request.feeds["x"].dtype == np.float32
    assert np.array_equal(request.feeds["x"], x)
    content, length = response("m", {"y": x * 2}, request)
    if binary:
        assert length is not None and content[length:] == (x * 2).tobytes()
    else:
        data = json.loads(content)["outputs"][0]["data"]
        assert length is None and np.array_equal(np.asarray(data, np.float32).reshape(x.shape), x * 2)
    assert metadata("m", "onnxruntime_onnx", INPUTS, OUTPUTS)["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 64, 32]}
    ]


def _free_port() -> int:
    """A port free now; something else may take it before a server binds it (see _serve)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Output:
    """A child's output lines as they come, read by a thread: waiting for one has a timeout, so a hung server fails
    the test with what it said instead of hanging the run."""

    def __init__(self, proc):
        self.lines, self.ended, self._queue = [], False, queue.Queue()

        def pump():
            for line in proc.stdout:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, prefix: str, seconds: float):
        """Read up to the first line starting with ``prefix`` (returned) or the end of the output (None)."""
        deadline = time.monotonic() + seconds
        while not self.ended:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"no line starting {prefix!r} within {seconds:g} s; the output so far:\n{self.text()}")
            if line is None:
                self.ended = True
                break
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        return None

    def rest(self, seconds: float = 60) -> str:
        """All of the output, once the child has ended."""
        self.until("\0", seconds)
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)


# what `edgeattn serve` says when its --port was taken after the test chose it: by check_port, by Ray's proxy, or
# by the wait for the model's URL (a proxy that could not bind leaves another process, or nothing, on the port)
PORT_TAKEN = ("cannot listen on", "Failed to bind", "does not answer")


def _serve(argv: list, env: dict, port: int, seconds: float = 240):
    """`edgeattn serve ARGV --port PORT` up to its "serving" line: (process, output), or None when it could not
    have the port (the caller tries another).  Any other exit fails the test with the server's output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeattn", "serve", *map(str, argv), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    out = _Output(proc)
    try:
        if out.until("serving", seconds) is not None:
            return proc, out
        proc.wait(timeout=60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    text = out.rest()
    if any(said in text for said in PORT_TAKEN):
        return None
    pytest.fail(f"edgeattn serve exited {proc.returncode} before serving:\n{text}")


def _stop(proc, out: _Output) -> str:
    """Ctrl-C to a server: its output once it has exited (fails the test after two minutes)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"edgeattn serve did not stop within 120 s of Ctrl-C:\n{out.text()}")
    return out.rest()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--replicas", "64"], "--replicas 64 needs 64 CPUs"),
        (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'"),
        (["--name", "a/b"], "--name 'a/b': a model name in a URL"),
    ],
)
def test_serve_refuses_bad_options_before_starting(tmp_path, capsys, argv, message):
    path = tmp_path / "m.onnx"
    torch.manual_seed(0)
    export_onnx(MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(8, 8)).eval(), [torch.randn(1, 64, 32)], path)
    assert main(["serve", str(path), *argv]) == 2  # refused before it would listen: no port needed
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_serve_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.onnx")]) == 2
    err = capsys.readouterr().err
    assert "nope.onnx" in err
    assert err.startswith("edgeattn: error: ") and "nope.onnx: no such file" in err and err.count("\n") == 1, err


def _ray_processes(tmpdir: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if tmpdir.encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


@contextlib.contextmanager
def _ray_cluster(env: dict, ray_tmp: str, log: Path):
    """A Ray cluster of the test's own (`ray start --head --block`, on a port Ray picks, under ``ray_tmp``): yields its
    address.  Leaving stops this cluster only: SIGTERM to its `ray start`, which takes down the processes it
    started, never a `ray stop` of every Ray process on the machine."""
    ray = str(Path(sys.executable).parent / "ray")
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"  # written once the cluster is up
    address_file.unlink(missing_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                ray,
                "start",
                "--head",
                "--port",
                "0",
                "--num-cpus",
                "2",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--block",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not (address_file.exists() and address_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.poll() is not None else "no cluster within 180 s"
                pytest.fail(f"ray start --head: {state}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield address_file.read_text().strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 30  # its workers go with their raylet
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)


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

    ray_tmp = tempfile.mkdtemp(prefix="ea", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    for _ in range(3):  # a port taken between choosing it and binding it: another port
        port = _free_port()
        argv = [path, "--replicas", "2", "--max-batch-size", "8", "--max-body-mb", "1", "--name", "nbr"]
        started = _serve(argv, env, port)
        if started:
            break
    assert started, "three free ports were taken before the server could bind them"
    proc, output = started
    try:
        assert output.lines[-1].startswith("serving nbr on ort-cpu (2 replicas"), output.text()
        base = f"http://127.0.0.1:{port}/v2/models/nbr"
        import urllib.request

        with urllib.request.urlopen(base, timeout=30) as r:
            assert json.loads(r.read())["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64, 32]}]

        for binary, seconds in [(True, LOAD_SECONDS), (False, LOAD_SECONDS / 4)]:
            report = load_test(f"{base}/infer", requests, clients=CLIENTS, seconds=seconds, binary=binary)
            worst = max(float(np.abs(outputs[out] - expected[i]).max()) for i, outputs, _ in report.answers)
            print(
                f"\n{CLIENTS} clients, {seconds:g} s, 2 replicas, {'binary' if binary else 'JSON'}: "
                f"{report.describe()}; largest difference from a direct onnxruntime run {worst:.1e}"
            )
            assert report.sent == len(report.answers) > CLIENTS and not report.failed, report.failed[:3]
            assert worst <= 1e-6

        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("nbr")
        x = tritonclient_http.InferInput("x", [2, 64, 32], "FP32")
        x.set_data_from_numpy(requests[1]["x"])
        result = client.infer("nbr", [x])
        assert np.abs(result.as_numpy(out) - expected[1]).max() <= 1e-6

        bad = [
            (_request(shape=[1, 64, 31]), 400, "the model takes [-1, 64, 32]"),
            (_request(datatype="INT64"), 400, "the model takes FP32"),
            (b'{"inputs": []}', 400, "missing input 'x'"),
            (b"{", 400, "not JSON"),
            (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
            (_request(shape=[64, 64, 32], data=[0.5] * (64 * 64 * 32)), 400, "above this server's --max-batch-size 8"),
            (_request(data=[0.5] * 2**19), 400, "above this server's --max-body-mb 1"),
        ]
        for body, want, message in bad:
            status, answer, _ = post(f"{base}/infer", body)
            assert status == want and message in answer["error"], answer
        status, answer, _ = post(f"http://127.0.0.1:{port}/v2/models/other/infer", *infer_request(requests[0]))
        assert status == 404 and "POST /v2/models/nbr/infer" in answer["error"]
        status, _, outputs = post(f"{base}/infer", *infer_request(requests[3]))  # and it still serves
        assert status == 200 and np.abs(outputs[out] - expected[3]).max() <= 1e-6

        out = _stop(proc, output)
        assert proc.returncode == 0 and out.strip().endswith("stopped"), out
        assert _ray_processes(ray_tmp) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_models_share_a_ray_cluster_and_leave_it_one_by_one(tmp_path):
    """The fleet path of docs/deploy/serve.md: `ray start --head`, then `edgeattn serve --address` twice on the same
    Serve proxy (an OpenVINO IR on openvino:HETERO:CPU, a device named, and an ONNX file on ort-cpu); stopping one
    leaves the other and the cluster."""
    import secrets

    import openvino as ov

    ir = tmp_path / "na2d-block.xml"
    assert main(["export", "na2d-block", "-o", str(ir)]) == 0
    torch.manual_seed(0)
    layer = tmp_path / "layer.onnx"
    export_onnx(MaskedSelfAttention(32, 2, masks.neighborhood(3), grid=(8, 8)).eval(), [torch.randn(1, 64, 32)], layer)
    rng = np.random.default_rng(1)
    tokens = {"tokens": rng.standard_normal((1, 3136, 64)).astype(np.float32)}
    x = {"x": rng.standard_normal((1, 64, 32)).astype(np.float32)}
    compiled = ov.Core().compile_model(str(ir), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected_ir = compiled(tokens)[0]
    expected_layer = ort.InferenceSession(str(layer), providers=["CPUExecutionProvider"]).run(None, x)[0]

    ray_tmp = tempfile.mkdtemp(prefix="ea", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def fleet(address, port, first):
        servers = {ir: first}
        try:
            servers[layer] = _serve([layer, "--address", address, "--name", "layer"], env, port)
            assert servers[layer], f"the second model could not join Serve's proxy on port {port}"
            again = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgeattn",
                    "serve",
                    str(layer),
                    "--address",
                    address,
                    "--port",
                    str(port),
                    "--name",
                    "layer",
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=180,
            )
            assert again.returncode == 2 and "a model named 'layer' is already served" in again.stderr, again.stderr
            base = f"http://127.0.0.1:{port}/v2/models"
            status, _, outputs = post(f"{base}/na2d-block/infer", *infer_request(tokens))
            assert status == 200 and np.abs(outputs["output"] - expected_ir).max() <= 1e-6
            status, _, outputs = post(f"{base}/layer/infer", *infer_request(x, binary=False))
            assert status == 200 and np.abs(next(iter(outputs.values())) - expected_layer).max() <= 1e-6

            out = _stop(*servers[ir])
            assert servers[ir][0].returncode == 0 and out.strip().endswith("stopped"), out
            assert post(f"{base}/na2d-block/infer", *infer_request(tokens))[0] == 404  # its route is gone
            status, _, outputs = post(f"{base}/layer/infer", *infer_request(x))  # the other one serves on
            assert status == 200 and np.abs(next(iter(outputs.values())) - expected_layer).max() <= 1e-6
            out = _stop(*servers[layer])
            assert servers[layer][0].returncode == 0, out
        finally:
            for proc, _ in filter(None, servers.values()):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    for _ in range(3):  # Serve's port taken between choosing it and its proxy binding it: another cluster and port
        with _ray_cluster(env, ray_tmp, tmp_path / "ray-start.log") as address:
            port = _free_port()
            first = _serve([ir, "--address", address, "--runtime", "openvino:HETERO:CPU"], env, port)
            if first:
                fleet(address, port, first)
                break
    assert first, "three free ports were taken before Serve's proxy could bind them"
    assert _ray_processes(ray_tmp) == []
