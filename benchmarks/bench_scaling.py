"""Per-token cost as the input grows: neighborhood attention k7 on square grids and a sliding window of 256 from 4k
to 64k tokens, edgeattn's ``auto`` export on onnxruntime and OpenVINO CPU.  Flat is the goal: each token's
work is the same at every length.

    python benchmarks/bench_scaling.py [--cases na2d sliding] [--tokens 4096 16384 65536] [--runs 10] [--profile]

One attention layer (dim 64, 2 heads x 32, the registered blocks' width) per case and length, checked against eager
PyTorch with the boolean mask (computed a chunk of query rows at a time).  Columns: per runtime the median ms and
the microseconds per token.  ``--profile`` adds onnxruntime's time per op type, in microseconds per token, to show
which op's cost grows.
"""

import argparse
import collections
import json
import math
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from bench_lm_masks import RUNTIMES, eager, errors, fmt, measure_lowering, write_json

from edgeattn.layers import MaskedSelfAttention
from edgeattn.masks import neighborhood, sliding_window
from edgeattn.runtimes.ort import flushed_denormals

CASES = {
    "na2d": lambda n: (neighborhood(7), dict(grid=(math.isqrt(n), math.isqrt(n)))),
    "sliding": lambda n: (sliding_window(256), dict(seq_len=n)),
}


def profile(path, x, runs, tmp):
    """onnxruntime's kernel time per op type over ``runs`` runs, microseconds per run, with denormals flushed as
    ``edgeattn.load`` does (else Softmax over masked scores takes several times longer)."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tmp) / "profile")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    with flushed_denormals():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(runs):
            session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
    return per_op


def bench(case, n, runs, tmp, with_profile):
    torch.manual_seed(0)
    mask, shape = CASES[case](n)
    if "grid" in shape and shape["grid"][0] ** 2 != n:
        raise SystemExit(f"na2d needs a square number of tokens, got {n}")
    layer = MaskedSelfAttention(64, 2, mask, layout="auto", **shape).eval()
    x = torch.randn(1, n, 64)
    ref, density = eager(layer, mask, x)
    row = dict(case=case, tokens=n, density=density)
    path = Path(tmp) / f"{case}-{n}.onnx"
    measure_lowering(layer, x, ref, path, "auto", runs, row, keep=with_profile)
    for runtime in RUNTIMES:
        ms = row.get(f"auto_{runtime}_ms")
        row[f"{runtime}_us_per_token"] = ms * 1e3 / n if ms else None
    if with_profile:
        row["ort_us_per_token_by_op"] = {op: us / n for op, us in profile(path, x, runs, tmp).most_common()}
        path.unlink()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="onnxruntime's time per op type, per token")
    p.add_argument("--json")
    args = p.parse_args()
    print(
        f"{'case':8s} {'tokens':>6s} {'density':>7s} | "
        + " | ".join(f"{r}: ms, us/token" for r in RUNTIMES)
        + " | file MB | max err"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for n in args.tokens:
                r = bench(case, n, args.runs, tmp, args.profile)
                rows.append(r)
                cells = [
                    f"{fmt(r.get(f'auto_{rt}_ms'), '8.2f')} {fmt(r[f'{rt}_us_per_token'], '6.3f')}" for rt in RUNTIMES
                ]
                print(
                    f"{case:8s} {n:6d} {r['density']:7.2%} | "
                    + " | ".join(cells)
                    + f" | {r['auto_file_mb']:.1f} | {errors(r)}",
                    flush=True,
                )
                if args.profile:
                    print(
                        "    ort us/token: "
                        + ", ".join(f"{op} {us:.3f}" for op, us in list(r["ort_us_per_token_by_op"].items())[:8]),
                        flush=True,
                    )
                write_json(args.json, rows)


if __name__ == "__main__":
    main()
