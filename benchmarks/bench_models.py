"""The model zoo side by side, one row per model: export time, file size, mask-table bytes, and each CPU runtime's
median latency and error against PyTorch eager, from `edgeattn bench MODEL --lowering auto` (one process, same inputs).

    python benchmarks/bench_models.py [--models nat-mini swin-t] [--runs 20] [--precision fp16] [--markdown] [--json F]

`bench_attention.py` compares lowerings on single attention blocks.
"""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

from edgeattn import bench, models

COLUMNS = ("model", "lowering", "export_s", "file_MB", "tables_MB", "torch_ms", "ort_ms", "ov_ms", "ort_x", "ov_x",
           "max_abs_err", "ok")


def measure(model: str, runs: int, precision: str) -> tuple[dict, list]:
    rows = bench.run(model, ["ort-cpu", "openvino-cpu"], ["auto"], runs=runs, precisions=[precision])
    by = {r.runtime: r for r in rows}
    torch_ms, ort, ov = by["torch"].p50_ms, by["ort-cpu"], by["openvino-cpu"]
    errors = [r.max_abs_err for r in (ort, ov) if r.max_abs_err is not None]
    return {"model": model, "lowering": ort.lowering, "export_s": ort.export_s, "file_MB": ort.file_mb,
            "tables_MB": ort.tables_mb, "torch_ms": torch_ms, "ort_ms": ort.p50_ms, "ov_ms": ov.p50_ms,
            "ort_x": torch_ms / ort.p50_ms if ort.p50_ms else None, "ov_x": torch_ms / ov.p50_ms if ov.p50_ms else None,
            "max_abs_err": max(errors, default=None), "ok": all(r.status == "ok" for r in (ort, ov))}, rows


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
    args = p.parse_args()
    summary, raw = [], {}
    for model in args.models:
        row, raw[model] = measure(model, args.runs, args.precision)
        summary.append(row)
        print(" ".join(cell(row[c]) for c in COLUMNS), flush=True)
    table = [COLUMNS] + [tuple(cell(r[c]) for c in COLUMNS) for r in summary]
    if args.markdown:
        print("\n".join("| " + " | ".join(row) + " |" for row in [table[0], ("---",) * len(COLUMNS), *table[1:]]))
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table))
    if args.json:
        Path(args.json).write_text(json.dumps({m: [asdict(r) for r in rows] for m, rows in raw.items()}, indent=2))


if __name__ == "__main__":
    main()
