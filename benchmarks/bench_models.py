"""The model zoo side by side, one row per model: export time, file size, mask-table bytes, and each CPU runtime's
median latency and error against PyTorch eager, from `edgeattn bench MODEL --lowering auto` (one process, same inputs).

    python benchmarks/bench_models.py [--models nat-mini swin-t] [--runs 20] [--precision fp16] [--markdown] [--json F]
    python benchmarks/bench_models.py --runtimes ort-cuda      # on a GPU machine with onnxruntime-gpu

`bench_attention.py` compares lowerings on single attention blocks.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from edgeattn import bench, models

SHORT = {"ort-cpu": "ort", "openvino-cpu": "ov", "ort-cuda": "cuda"}


def columns(runtimes: list[str]) -> tuple[str, ...]:
    short = [SHORT.get(r, r) for r in runtimes]
    return (
        "model",
        "lowering",
        "export_s",
        "file_MB",
        "tables_MB",
        "torch_ms",
        *[f"{s}_ms" for s in short],
        *[f"{s}_x" for s in short],
        "max_abs_err",
        "ok",
    )


def measure(model: str, runs: int, precision: str, runtimes: list[str]) -> tuple[dict, list]:
    """One model on each runtime; torch_ms is eager PyTorch on the CPU (what `edgeattn bench` compares with)."""
    rows = bench.run(model, runtimes, ["auto"], runs=runs, precisions=[precision])
    by = {r.runtime: r for r in rows}
    torch_ms, first = by["torch"].p50_ms, by[runtimes[0]]
    errors = [by[r].max_abs_err for r in runtimes if by[r].max_abs_err is not None]
    row = {
        "model": model,
        "lowering": first.lowering,
        "export_s": first.export_s,
        "file_MB": first.file_mb,
        "tables_MB": first.tables_mb,
        "torch_ms": torch_ms,
        "max_abs_err": max(errors, default=None),
        "ok": all(by[r].status == "ok" for r in runtimes),
    }
    for r in runtimes:
        ms = by[r].p50_ms
        row[f"{SHORT.get(r, r)}_ms"], row[f"{SHORT.get(r, r)}_x"] = ms, torch_ms / ms if ms else None
    return row, rows


def cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.1e}" if value < 1e-2 else f"{value:.2f}"
    return "-" if value is None else str(value)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=models.names())
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--precision", default="fp32", choices=bench.PRECISIONS)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", help="write every bench row to this file")
    p.add_argument("--runtimes", nargs="+", default=["ort-cpu", "openvino-cpu"], help="default: %(default)s")
    args = p.parse_args()
    cols = columns(args.runtimes)
    summary, raw = [], {}
    for model in args.models:
        row, raw[model] = measure(model, args.runs, args.precision, args.runtimes)
        summary.append(row)
        print(" ".join(cell(row[c]) for c in cols), flush=True)
        if args.json:  # after each model, so a run stopped part-way keeps what it measured
            Path(args.json).write_text(json.dumps({m: [asdict(r) for r in rows] for m, rows in raw.items()}, indent=2))
    table = [cols] + [tuple(cell(r[c]) for c in cols) for r in summary]
    if args.markdown:
        print("\n".join("| " + " | ".join(row) + " |" for row in [table[0], ("---",) * len(cols), *table[1:]]))
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table))


if __name__ == "__main__":
    main()
