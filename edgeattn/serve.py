"""``edgeattn serve FILE``: a model file behind Ray Serve, answering the KServe v2 REST protocol that Triton and
OpenVINO Model Server speak, so one client works against all three.

- ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME``, ``/v2/models/NAME/ready``;
- ``POST /v2/models/NAME/infer`` (or ``.../versions/1/infer``) with JSON
  ``{"inputs": [{"name", "shape", "datatype", "data"}]}``, row-major ``data``; the answer has ``outputs`` alike.
  Triton's binary tensor extension is understood too (``Inference-Header-Content-Length``, ``binary_data_size``,
  ``binary_data_output``), so ``tritonclient.http`` works unchanged; it skips JSON's cost on large tensors.

Each request is checked (names, datatypes, shapes) before it joins a batch, and a bad one gets HTTP 400 with one line
saying what was wrong.  Requests that arrive together are batched (Ray Serve's ``serve.batch``): when every input and
output of the file has a symbolic first axis (``export --dynamic-batch``) they run as one concatenated batch, otherwise
one after the other.  The file's bytes travel to the replicas through Ray, so on a cluster (``--address``) a replica on
another machine needs edgeattn and the runtime installed, not the file.  There each model is routed under
``/v2/models/NAME`` (several share Serve's proxy) and stopping removes only that model; started alone, it owns ``/``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from . import runtimes
from .errors import EdgeAttnError, first_line
from .export.repository import DATATYPES, batchable, model_name
from .onnxfile import TensorInfo, formats

DTYPES = {name: dtype for dtype, name in DATATYPES.items()}
VERSION = "1"


class BadRequest(EdgeAttnError):
    """A request the server answers with HTTP ``status`` and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def metadata(name: str, platform: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> dict:
    """The KServe v2 model metadata response (-1 for a symbolic axis)."""

    def tensors(infos):
        return [
            {
                "name": t.name,
                "datatype": DATATYPES.get(t.dtype, str(t.dtype)),
                "shape": [-1 if isinstance(d, str) else d for d in t.shape],
            }
            for t in infos
        ]

    return {
        "name": name,
        "versions": [VERSION],
        "platform": platform,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
    }


@dataclass
class Request:
    """A parsed infer request: the feeds, the outputs asked for (by name: binary or not), its ``id``."""

    feeds: dict
    outputs: dict
    id: object = None


def parse_request(
    body: bytes,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    header_length: Optional[str] = None,
    max_batch_size: Optional[int] = None,
) -> Request:
    """A KServe v2 infer request -> :class:`Request`, or :class:`BadRequest`.  ``header_length`` is the
    ``Inference-Header-Content-Length`` header: the JSON is that many bytes, binary tensors follow.  A request of a
    batch above ``max_batch_size`` is refused, as Triton refuses one above its ``max_batch_size``."""
    try:
        return _parsed(body, inputs, outputs, header_length, max_batch_size)
    except BadRequest:
        raise
    except Exception as e:  # whatever else a body makes the parser raise is the body's fault: one line, 400
        raise BadRequest(f"the request could not be read: {type(e).__name__}: {first_line(e)}") from None


def _parsed(body, inputs, outputs, header_length, max_batch_size) -> Request:
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
        body, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply to read") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest('the request must be a JSON object with an "inputs" list')
    expected = {t.name: t for t in inputs}
    feeds = {}
    for item in request["inputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size") if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or not {"name", "shape", "datatype"} <= item.keys()
            or ("data" not in item and size is None)
        ):
            raise BadRequest('each input needs "name", "shape", "datatype" and "data" (or binary_data_size)')
        name = item["name"]
        if name not in expected:
            raise BadRequest(f"unexpected input {name!r}; the model takes {list(expected)}")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        info = expected[name]
        want = DATATYPES.get(info.dtype, str(info.dtype))
        if item["datatype"] != want:
            raise BadRequest(f"input {name!r}: datatype {item['datatype']!r}, the model takes {want}")
        shape = item["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if len(shape) != len(info.shape) or any(isinstance(d, int) and d != s for d, s in zip(info.shape, shape)):
            model = [d if isinstance(d, int) else -1 for d in info.shape]
            raise BadRequest(f"input {name!r}: shape {shape}, the model takes {model} (-1: any)")
        if max_batch_size and shape and batchable(inputs, outputs) and shape[0] > max_batch_size:
            raise BadRequest(
                f"input {name!r}: a batch of {shape[0]} is above this server's --max-batch-size {max_batch_size}; "
                f"send at most {max_batch_size} rows per request"
            )
        count = math.prod(shape)  # Python ints: numpy would wrap a huge shape around to a small count
        if size is not None:
            if not isinstance(size, int) or size != count * info.dtype.itemsize or size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size!r}, shape {shape} of {want} takes "
                    f"{count * info.dtype.itemsize} bytes ({len(binary)} left in the body)"
                )
            array, binary = np.frombuffer(binary[:size], dtype=info.dtype), binary[size:]
        else:
            try:
                array = np.asarray(item["data"], dtype=info.dtype)
            except (TypeError, ValueError) as e:
                raise BadRequest(f"input {name!r}: data is not a list of {want} numbers: {e}") from None
            if array.size != count:
                raise BadRequest(f"input {name!r}: {array.size} values for shape {shape} ({count})")
        feeds[name] = array.reshape(shape)
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise BadRequest(f"missing input {', '.join(map(repr, missing))}; the model takes {list(expected)}")
    sizes = {a.shape[0] for a in feeds.values()}
    if batchable(inputs, outputs) and len(sizes) > 1:
        raise BadRequest(f"inputs disagree on the batch size (axis 0): {sorted(sizes)}")
    if len(binary):
        raise BadRequest(f"{len(binary)} bytes of binary data after the inputs that no binary_data_size claims")
    names = [t.name for t in outputs]
    wanted = request.get("outputs")
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        asked = dict.fromkeys(names, binary_default)
    elif not isinstance(wanted, list) or not all(isinstance(o, dict) and o.get("name") in names for o in wanted):
        raise BadRequest(f'"outputs" must list outputs of the model by name: {names}')
    else:
        asked = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", binary_default)) for o in wanted}
    return Request(feeds, asked, request.get("id"))


def encode_tensor(name: str, array: np.ndarray, binary: bool) -> tuple[dict, bytes]:
    """One tensor of a request or an answer: its JSON item, and its bytes when sent binary (else ``b""``)."""
    array = np.ascontiguousarray(array)
    item = {"name": name, "shape": list(array.shape), "datatype": DATATYPES.get(array.dtype, str(array.dtype))}
    if binary:
        item["parameters"] = {"binary_data_size": array.nbytes}
        return item, array.tobytes()
    item["data"] = array.ravel().tolist()
    return item, b""


def response(model: str, outputs: Mapping[str, np.ndarray], request: Request) -> tuple[bytes, Optional[int]]:
    """The answer's body and, when it carries binary tensors, the length of its JSON part."""
    encoded = [encode_tensor(name, outputs[name], as_binary) for name, as_binary in request.outputs.items()]
    body = {"model_name": model, "model_version": VERSION, "outputs": [item for item, _ in encoded]}
    if request.id is not None:
        body["id"] = request.id
    head = json.dumps(body).encode()
    return head + b"".join(data for _, data in encoded), (len(head) if any(request.outputs.values()) else None)


class Model:
    """What one replica serves: the file loaded on a runtime, answering parsed requests in batches."""

    def __init__(self, files: Mapping[str, bytes], runtime: str):
        folder = tempfile.mkdtemp(prefix="edgeattn-serve-")
        try:
            for filename, data in files.items():
                Path(folder, filename).write_bytes(data)
            path = Path(folder, next(iter(files)))
            self.session = runtimes.load(path, runtime)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the runtimes hold the model in memory (or a mapping)
        self.inputs, self.outputs = self.session.inputs, self.session.outputs
        self.batchable = batchable(self.inputs, self.outputs)
        self.platform = "openvino" if self.session.runtime.startswith("openvino") else "onnxruntime_onnx"
        self.lock = threading.Lock()

    def run_batch(self, feeds_list: Sequence[dict]) -> list[dict]:
        """Outputs for each of ``feeds_list``; batchable files run all of them as one batch."""
        with self.lock:
            if not self.batchable or len(feeds_list) == 1:
                return [self.session.run(feeds) for feeds in feeds_list]
            sizes = [next(iter(f.values())).shape[0] for f in feeds_list]
            merged = self.session.run({n: np.concatenate([f[n] for f in feeds_list]) for n in feeds_list[0]})
            bounds = np.cumsum([0, *sizes])
            return [{n: a[lo:hi] for n, a in merged.items()} for lo, hi in itertools.pairwise(bounds)]


def deployment(name: str, runtime: str, max_batch_size: int, batch_wait_s: float, max_body_bytes: int):
    """The Ray Serve deployment for one model, to bind to ``files`` (Ray is imported here, so ``import edgeattn``
    does not need it)."""
    import asyncio

    from ray import serve
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, Response

    prefix = f"/v2/models/{name}"

    @serve.deployment(name=name)
    class ModelServer:
        def __init__(self, files: Mapping[str, bytes]):
            self.model = Model(files, runtime)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def infer(self, feeds_list: list) -> list:
            try:
                return await asyncio.to_thread(self.model.run_batch, feeds_list)
            except Exception as e:  # the batch failed as a whole: answer each request of it alone
                return [self._alone(feeds) or e for feeds in feeds_list]

        def _alone(self, feeds):
            try:
                return self.model.run_batch([feeds])[0]
            except Exception:
                return None

        async def __call__(self, request: HttpRequest):
            path = request.url.path.rstrip("/")
            if path in ("/v2/health/live", "/v2/health/ready", f"{prefix}/ready", f"{prefix}/versions/{VERSION}/ready"):
                return JSONResponse({})
            if path in (prefix, f"{prefix}/versions/{VERSION}") and request.method == "GET":
                m = self.model
                return JSONResponse(metadata(name, m.platform, m.inputs, m.outputs))
            if path not in (f"{prefix}/infer", f"{prefix}/versions/{VERSION}/infer"):
                return JSONResponse(
                    {"error": f"no such endpoint {request.method} {path}; this server has POST {prefix}/infer"},
                    status_code=404,
                )
            if request.method != "POST":
                return JSONResponse({"error": f"{path} takes POST"}, status_code=405)
            declared = request.headers.get("content-length", "")
            too_big = f"above this server's --max-body-mb {max_body_bytes / 2**20:g}: send fewer rows per request"
            if declared.isdigit() and int(declared) > max_body_bytes:  # refused before it is read
                return JSONResponse({"error": f"a {int(declared)}-byte body is {too_big}"}, status_code=400)
            body = await request.body()
            if len(body) > max_body_bytes:
                return JSONResponse({"error": f"a {len(body)}-byte body is {too_big}"}, status_code=400)
            try:
                parsed = parse_request(
                    body,
                    self.model.inputs,
                    self.model.outputs,
                    request.headers.get("inference-header-content-length"),
                    max_batch_size,
                )
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            outputs = await self.infer(parsed.feeds)
            if isinstance(outputs, Exception):
                return JSONResponse({"error": f"the runtime failed on this request: {outputs}"}, status_code=500)
            content, header_length = response(name, outputs, parsed)
            if header_length is None:
                return Response(content, media_type="application/json")
            return Response(
                content,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(header_length)},
            )

    return ModelServer


def model_files(path) -> dict[str, bytes]:
    """The file and its companions (an IR's ``.bin``), by file name, first the one to load."""
    path = Path(path)
    files = {path.name: path.read_bytes()}
    if path.suffix == ".xml":
        files[path.with_suffix(".bin").name] = path.with_suffix(".bin").read_bytes()
    return files


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise EdgeAttnError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None


def start_serve(ray_serve, host: str, port: int) -> None:
    """Start Serve, or join the one on the cluster.  Two commands starting it at once race to create its controller
    and proxy; the loser (a taken name, or its proxy killed) tries again and joins the winner's."""
    from ray.exceptions import RayActorError

    for attempt in range(3):
        try:
            ray_serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "ERROR"})
            return
        except (ValueError, RayActorError) as e:
            if (isinstance(e, ValueError) and "already taken" not in str(e)) or attempt == 2:
                raise
            time.sleep(2)


def wait_until_ready(url: str, stop: threading.Event, seconds: float = 60.0) -> None:
    """Wait for ``url`` to answer 200: Serve on a cluster may already listen on another port than the one asked."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise EdgeAttnError(
                f"the model is deployed but {url} does not answer: Ray Serve on this cluster "
                "listens on another host or port (see `serve status`); pass that --host and --port"
            )
        time.sleep(0.5)


def serve(
    path,
    runtime: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    max_body_mb: float = 256.0,
    address: Optional[str] = None,
    name: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> None:
    """Serve ``path`` until SIGINT or SIGTERM, then shut the application (and a Ray started here) down."""
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise EdgeAttnError("edgeattn serve needs Ray Serve: pip install 'edgeattn[serve]'") from None
    head = formats.header(path)
    name = name or model_name(head.metadata)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise EdgeAttnError(f"--name {name!r}: a model name in a URL takes letters, digits and _ . - only")
    if replicas < 1 or max_batch_size < 1 or batch_wait_ms < 0 or not max_body_mb > 0:
        raise EdgeAttnError(
            "--replicas and --max-batch-size must be at least 1, --batch-wait-ms at least 0, --max-body-mb above 0"
        )
    if address is None and replicas > (os.cpu_count() or 1):
        raise EdgeAttnError(
            f"--replicas {replicas} needs {replicas} CPUs and this machine has {os.cpu_count()}: "
            "serve fewer here, or start a Ray cluster and pass --address auto"
        )
    session = runtimes.load(path, runtime)  # a bad file or an unavailable runtime fails here, in one line
    runtime = session.runtime
    del session
    if address is None:  # on a cluster, Serve's proxy may already hold the port (and it may be on another machine)
        check_port(host, port)
    files = model_files(path)

    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    taken = False
    try:
        for s in previous:
            signal.signal(s, on_signal)
        if address is None:
            ray.init(
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=False,
                object_store_memory=max(sum(map(len, files.values())) * 4, 80 * 2**20),
            )
        else:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        for s in previous:  # Ray may have installed its own
            signal.signal(s, on_signal)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would bury ours
        app = deployment(name, runtime, max_batch_size, batch_wait_ms / 1000, int(max_body_mb * 2**20))
        if not stop.is_set():
            start_serve(ray_serve, host, port)
            if address is not None and name in ray_serve.status().applications:
                taken = True  # not ours to remove on the way out
                raise EdgeAttnError(f"a model named {name!r} is already served on this cluster; pass another --name")
            # on a shared cluster each model has its own route, so several share Serve's one HTTP proxy
            ray_serve.run(
                app.options(num_replicas=replicas).bind(files),
                name=name,
                route_prefix="/" if address is None else f"/v2/models/{name}",
                logging_config={"log_level": "ERROR"},
            )
            wait_until_ready(f"http://{host}:{port}/v2/models/{name}/ready", stop)
        if not stop.is_set():
            log(
                f"serving {name} on {runtime} ({replicas} replica{'s' if replicas > 1 else ''}, batches up to "
                f"{max_batch_size}) at http://{host}:{port}/v2/models/{name}/infer; Ctrl-C stops"
            )
        while not stop.wait(0.5):
            pass
        log("stopping")
    except ray.exceptions.RayError as e:  # Ray's own failure, in one line (its logs are in Ray's session folder)
        raise EdgeAttnError(f"Ray Serve failed: {first_line(e)}") from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Ray's processes behind
        try:
            if ray.is_initialized():
                if address is None:
                    ray_serve.shutdown()
                elif not taken:  # on a shared cluster only this application goes
                    ray_serve.delete(name)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
    log("stopped")


@dataclass
class LoadReport:
    """What :func:`load_test` measured: every answer by request, latencies in ms, requests per second."""

    sent: int = 0
    answers: list = field(default_factory=list)  # (feeds index, outputs or error string, latency ms)
    seconds: float = 0.0

    @property
    def failed(self) -> list:
        return [a for a in self.answers if isinstance(a[1], str)]

    def percentile(self, q: float) -> float:
        return float(np.percentile([a[2] for a in self.answers], q)) if self.answers else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.answers) / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        return (
            f"{len(self.answers)} answers to {self.sent} requests ({len(self.failed)} failed) in "
            f"{self.seconds:.1f} s: {self.throughput:.1f} req/s, p50 {self.percentile(50):.1f} ms, "
            f"p99 {self.percentile(99):.1f} ms"
        )


def infer_request(feeds: Mapping[str, np.ndarray], binary: bool = True) -> tuple[bytes, dict]:
    """A KServe v2 infer request for ``feeds``, body and headers: tensors as bytes (Triton's binary extension, answers
    too) or as JSON lists."""
    encoded = [encode_tensor(name, array, binary) for name, array in feeds.items()]
    request = {"inputs": [item for item, _ in encoded]}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    head = json.dumps(request).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(data for _, data in encoded), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def post(url: str, body: bytes, headers: Optional[dict] = None, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """POST ``body`` to ``url``: (HTTP status, the answer's JSON, its outputs as arrays by name)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw, length = r.status, r.read(), r.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as e:
        status, raw, length = e.code, e.read(), None
    head, tail = (raw[: int(length)], memoryview(raw)[int(length) :]) if length else (raw, b"")
    try:
        answer = json.loads(head or b"{}")
    except ValueError:  # an error page of a proxy in front of the model, not a KServe answer
        return status, {"error": bytes(head).decode(errors="replace").strip()}, {}
    outputs = {}
    for o in answer.get("outputs", []):
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(o["data"], dtype=DTYPES[o["datatype"]])
        else:
            array, tail = np.frombuffer(tail[:size], dtype=DTYPES[o["datatype"]]), tail[size:]
        outputs[o["name"]] = array.reshape(o["shape"])
    return status, answer, outputs


def load_test(
    url: str, requests: Sequence[Mapping[str, np.ndarray]], clients: int = 8, seconds: float = 20.0, binary: bool = True
) -> LoadReport:
    """``clients`` threads post ``requests`` round-robin to ``url`` for ``seconds``; every answer is kept."""
    bodies = [infer_request(r, binary) for r in requests]
    report, lock = LoadReport(), threading.Lock()
    counter = iter(range(1 << 62))
    deadline = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter) % len(bodies)
                report.sent += 1
            t0 = time.perf_counter()
            try:
                status, answer, outputs = post(url, *bodies[i])
                result = outputs if status == 200 else f"HTTP {status}: {answer.get('error')}"
            except Exception as e:  # a lost request is a result, not a crash of the load test
                result = f"{type(e).__name__}: {e}"
            with lock:
                report.answers.append((i, result, (time.perf_counter() - t0) * 1000))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - start
    return report
