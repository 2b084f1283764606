"""`edgeattn serve` under load: throughput and p50/p99 latency by replicas and batch size, next to direct runs.

    python benchmarks/bench_serve.py [--model nat-tiny] [--seconds 15] [--clients 8] [--markdown]

Exports the model with a dynamic batch once, then for each configuration starts `edgeattn serve` (Ray Serve, KServe
v2 with Triton's binary tensors, or plain JSON) on 127.0.0.1, lets `--clients` threads post requests for `--seconds`,
checks every answer against a direct onnxruntime run of the same feeds, and stops the server.  The first row is the
same file run directly (one thread, no HTTP): what serving costs on top.  Clients and server share this machine's cores.
"""

import argparse
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

from edgeattn.cli import main as edgeattn_main
from edgeattn.serve import load_test

CONFIGS = [(1, 1, True), (1, 8, True), (2, 8, True), (2, 8, False)]  # (replicas, max batch size, binary tensors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path, replicas, batch, name="bench"):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeattn",
            "serve",
            str(path),
            "--port",
            str(port),
            "--name",
            name,
            "--replicas",
            str(replicas),
            "--max-batch-size",
            str(batch),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc, f"http://127.0.0.1:{port}/v2/models/{name}/infer"
    raise RuntimeError(f"edgeattn serve did not start (exit {proc.wait()})")


def stop(proc):
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nat-tiny")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp())
    path = folder / f"{args.model}.onnx"
    assert edgeattn_main(["export", args.model, "-o", str(path), "--dynamic-batch"]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(8):
        feeds = {}
        for i in session.get_inputs():
            shape = [1 if isinstance(d, str) or d is None else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        requests.append(feeds)
    expected = [session.run(None, r) for r in requests]
    names = [o.name for o in session.get_outputs()]

    rows = []
    t0, latencies = time.perf_counter(), []
    while time.perf_counter() - t0 < args.seconds:
        t = time.perf_counter()
        session.run(None, requests[len(latencies) % len(requests)])
        latencies.append((time.perf_counter() - t) * 1000)
    rows.append(
        (
            "direct onnxruntime, 1 thread",
            len(latencies) / (time.perf_counter() - t0),
            np.percentile(latencies, 50),
            np.percentile(latencies, 99),
            "-",
            0.0,
        )
    )
    del session

    for replicas, batch, binary in CONFIGS:
        proc, url = start(path, replicas, batch)
        try:
            report = load_test(url, requests, clients=args.clients, seconds=args.seconds, binary=binary)
        finally:
            stop(proc)
        worst = max(
            (
                max(float(np.abs(out[n] - expected[i][k]).max()) for k, n in enumerate(names))
                for i, out, _ in report.answers
                if not isinstance(out, str)
            ),
            default=float("nan"),
        )
        rows.append(
            (
                f"serve, {replicas} replica{'s' if replicas > 1 else ''}, batch <= {batch}, "
                f"{'binary' if binary else 'JSON'}",
                report.throughput,
                report.percentile(50),
                report.percentile(99),
                f"{len(report.answers) - len(report.failed)}/{report.sent}",
                worst,
            )
        )

    print(f"{args.model}, {args.clients} clients x {args.seconds:g} s, {os.cpu_count()} CPUs")
    if args.markdown:
        print(
            "| configuration | req/s | p50 ms | p99 ms | answered | max abs diff vs direct |\n|---|---|---|---|---|---|"
        )
        for name, rps, p50, p99, ok, diff in rows:
            print(f"| {name} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {ok} | {diff:.1e} |")
    else:
        for name, rps, p50, p99, ok, diff in rows:
            print(f"{name:44s} {rps:7.1f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  {ok:>9s}  diff {diff:.1e}")


if __name__ == "__main__":
    main()
