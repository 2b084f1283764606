"""Side by side, in one process: each reference model in PyTorch eager and its export on every CPU runtime.

    python benchmarks/bench_models.py [--models nat-tiny swin-tiny-block] [--runs 30] [--json out.json]

Prints medians (ms) and the ratio to torch eager for the default (custom-op) and the inlined export, from one run
on the same inputs, with the default `auto` lowering (block tables for sparse masks; `bench_attention.py` compares lowerings).
"""
import argparse
import json
import tempfile
from pathlib import Path

from edgeattn import models, parity
from edgeattn.export import export_registered


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=models.names())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json")
    args = p.parse_args()
    names = parity.default_runtimes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for inline in (False, True):
                path = Path(tmp) / f"{model}-{inline}.onnx"
                result = export_registered(model, path, inline=inline)
                for r in parity.check_file(path, names, runs=args.runs):
                    rows.append(dict(model=model, export="inline" if inline else "custom-op", runtime=r.runtime,
                                     ok=r.ok, max_abs_err=r.max_abs_err, p50_ms=r.p50_ms, p90_ms=r.p90_ms,
                                     file_mb=result.file_bytes / 1e6, table_mb=result.table_bytes / 1e6))
    print(f"{'model':16s} {'export':9s} {'runtime':13s} {'ok':3s} {'max_abs_err':>11s} {'p50_ms':>8s} "
          f"{'p90_ms':>8s} {'vs torch':>8s} {'file_MB':>7s}")
    for row in rows:
        eager = next(r["p50_ms"] for r in rows if r["model"] == row["model"] and r["runtime"] == "torch"
                     and r["export"] == row["export"])
        if row["p50_ms"] is None:  # the runtime failed to load or run: the ok column says so
            print(f"{row['model']:16s} {row['export']:9s} {row['runtime']:13s} NO  {'-':>11s}")
            continue
        print(f"{row['model']:16s} {row['export']:9s} {row['runtime']:13s} {'yes' if row['ok'] else 'NO':3s} "
              f"{row['max_abs_err']:11.2e} {row['p50_ms']:8.2f} {row['p90_ms']:8.2f} {eager / row['p50_ms']:7.2f}x "
              f"{row['file_mb']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
