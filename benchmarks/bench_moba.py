"""MoBA routed attention at increasing lengths: the ``routed`` lowering (only the chosen key blocks are scored)
against ``routed_dense`` (the same choice as one dense mask) and eager PyTorch, on onnxruntime and OpenVINO CPU.

    python benchmarks/bench_moba.py                                   # 4k-32k tokens, dense up to 16k
    python benchmarks/bench_moba.py --lengths 8192 --runs 20 --json moba.json

One ``moba-block`` per length (dim 64, 2 heads x 32, blocks of 128, each query its own block + the top-3 earlier
blocks, MoBA's gate), the same weights and input for every row, each runtime's output checked against eager.
Columns per runtime: median ms of the dense and the routed lowering, their ratio, and the routed file's
throughput on the work the chosen blocks need (4 * heads * head_dim * N * top_k * block FLOPs: scores and values
for every chosen block and the own block, fully).  Eager is edgeattn's PyTorch reference (dense over chunks of
1,024 queries with the routed mask), the module's own forward.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from bench_attention import median_ms
from bench_lm_masks import RUNTIMES, errors, fmt, measure_lowering, write_json

from edgeattn.models.moba import MobaBlock

BLOCK, TOP_K, DIM, HEADS = 128, 4, 64, 2


def bench(n, runs, eager_runs, dense, tmp):
    torch.manual_seed(0)
    block = MobaBlock(DIM, HEADS, seq_len=n, block=BLOCK, top_k=TOP_K).eval()
    x = torch.randn(1, n, DIM)
    with torch.no_grad():
        ref = block(x)
        row = dict(tokens=n, eager_ms=median_ms(lambda: block(x), eager_runs))
    row["chosen_gflop"] = 4 * HEADS * (DIM // HEADS) * n * TOP_K * BLOCK / 1e9
    for lowering in ("auto", "dense") if dense else ("auto",):
        measure_lowering(block, x, ref, Path(tmp) / f"moba-{n}-{lowering}.onnx", lowering, runs, row)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--eager-runs", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=16384, help="longest length with the dense lowering (N^2 memory)")
    p.add_argument("--json")
    args = p.parse_args()
    print(
        f"torch threads {torch.get_num_threads()}; median of {args.runs} runs ({args.eager_runs} for eager); "
        f"blocks of {BLOCK}, top-{TOP_K} with the own block, {HEADS} heads x {DIM // HEADS}"
    )
    print(
        f"{'tokens':>6s} {'eager ms':>9s} | "
        + " | ".join(f"{r}: dense ms, routed ms, x dense, x eager, GFLOP/s" for r in RUNTIMES)
        + " | file MB | max err"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lengths:
            r = bench(n, args.runs, args.eager_runs, n <= args.dense_max, tmp)
            rows.append(r)
            cells = []
            for rt in RUNTIMES:
                d, a = r.get(f"dense_{rt}_ms"), r.get(f"auto_{rt}_ms")
                r[f"{rt}_x_dense"] = d / a if d and a else None
                r[f"{rt}_x_eager"] = r["eager_ms"] / a if a else None
                r[f"{rt}_gflops"] = r["chosen_gflop"] / a * 1e3 if a else None
                cells.append(
                    f"{fmt(d, '8.1f')} {fmt(a, '7.1f')} {fmt(r[f'{rt}_x_dense'], '5.1f')}x "
                    f"{fmt(r[f'{rt}_x_eager'], '5.1f')}x {fmt(r[f'{rt}_gflops'], '5.1f')}"
                )
            print(
                f"{n:6d} {r['eager_ms']:9.1f} | " + " | ".join(cells) + f" | {r['auto_file_mb']:.2f} | " + errors(r),
                flush=True,
            )
            write_json(args.json, rows)


if __name__ == "__main__":
    main()
