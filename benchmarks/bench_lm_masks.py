"""LM-style masks at increasing lengths: edgeattn's ``auto`` export (block tables, bucketed by key count where a
plain block table would pad to dense work) against its dense lowering, on onnxruntime and OpenVINO CPU.

    python benchmarks/bench_lm_masks.py                       # causal, prefix-LM, document, sliding; 2k-8k tokens
    python benchmarks/bench_lm_masks.py --masks causal --lengths 2048 4096 8192 16384 --runs 5 --json lm.json
    python benchmarks/bench_lm_masks.py --masks sliding --lengths 4096 16384 65536 --no-dense   # scaling

One attention layer (dim 64, 2 heads x 32: the registered LM blocks' width) per mask and length, the same weights
and input for every row, each checked against eager PyTorch with the dense boolean mask.  Masks: causal;
prefix-LM (the first quarter of the tokens is visible to every query, causal after it); document (causal within
each document, nothing across; documents of seeded random lengths); sliding window 256.  Columns: the table
``auto`` chose and the share of the dense scores it computes, then per runtime the median ms of the dense
lowering and of ``auto``, their ratio, and the files' sizes.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_attention import RUNTIMES, WARMUP, interleaved_ms, load_checked

from edgeattn import tables
from edgeattn.export import export_onnx
from edgeattn.layers import MaskedSelfAttention, split_qkv
from edgeattn.masks import causal, custom, or_masks, sliding_window
from edgeattn.masks.base import evaluate, index_grid


def prefix_lm(n):
    prefix = n // 4
    return or_masks(causal(), custom(lambda b, h, q, kv: kv < prefix, name=f"prefix{prefix}"))


def document(n, seed=0):
    """Causal inside each document, nothing across; lengths drawn between n/16 and n/4 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(n // 16, n // 4 + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - n
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return custom(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q), name=f"document_{len(lengths)}docs")


MASKS = {
    "causal": lambda n: causal(),
    "prefix-lm": prefix_lm,
    "document": document,
    "sliding": lambda n: sliding_window(256),
}


def describe(table):
    if isinstance(table, tables.BucketedTable):
        return f"blocked, {len(table.buckets)} buckets"
    return table.layout


def bench(mask_name, n, runs, tmp, lowerings=("dense", "auto")):
    torch.manual_seed(0)
    mask = MASKS[mask_name](n)
    layer = MaskedSelfAttention(64, 2, mask, seq_len=n, layout="auto").eval()
    x = torch.randn(1, n, 64)
    ref, density = eager(layer, mask, x)
    table = layer.table.table
    row = dict(
        mask=mask_name, tokens=n, density=density, auto=describe(table), auto_work=getattr(table, "work_fraction", 1.0)
    )
    measure_lowerings(
        layer, x, ref, {lowering: Path(tmp) / f"{mask_name}-{n}-{lowering}.onnx" for lowering in lowerings}, runs, row
    )
    for runtime in RUNTIMES:
        d, a = row.get(f"dense_{runtime}_ms"), row.get(f"auto_{runtime}_ms")
        row[f"{runtime}_speedup"] = d / a if d and a else None
    return row


def eager(layer, mask, x, chunk=2048):
    """Eager PyTorch with the boolean mask, what every row is checked against, and the mask's density.  It runs
    ``chunk`` query rows at a time: the whole N x N mask and scores would not fit in memory at 64k tokens."""
    n, shape = x.shape[1], layer.table.shape  # a sequence or a grid
    mask_mod, _ = mask.mods(shape)
    outs, allowed = [], 0
    with torch.no_grad():
        q, k, v = split_qkv(layer.qkv(x), layer.heads, layer.head_dim)
        for start in range(0, n, chunk):
            rows = evaluate(mask_mod, index_grid(shape, 1, slice(start, start + chunk)), 1, name=mask.name)
            allowed += int(rows.sum())
            outs.append(F.scaled_dot_product_attention(q[:, :, start : start + chunk], k, v, attn_mask=rows))
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, n, -1)
        return layer.proj(out), allowed / n**2


def measure_lowering(model, x, ref, path, lowering, runs, row, keep=False):
    """:func:`measure_lowerings` for one lowering."""
    measure_lowerings(model, x, ref, {lowering: path}, runs, row, keep)


def measure_lowerings(model, x, ref, paths, runs, row, keep=False):
    """Export ``model`` at ``x`` once per lowering (``paths``: lowering -> file), then per runtime load every file
    and record in ``row`` (keys ``<lowering>_<runtime>_``) the load time, the max error against ``ref`` and the
    median ms, the files timed in turns so that the machine's drift hits every lowering alike.  A failed runtime is
    reported, not fatal.  The files are deleted afterwards unless ``keep``."""
    for lowering, path in paths.items():
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            export_onnx(model, (x,), path, lowering=lowering)
        row[f"{lowering}_file_mb"] = path.stat().st_size / 1e6
    for runtime in RUNTIMES:
        timed = {}  # lowering -> run function
        for lowering, path in paths.items():
            part = dict(runtime=runtime)
            run = load_checked(part, path, x, ref)  # a failure is the row's (part["error"]), not fatal
            for name, key in (("load_s", "load_s"), ("max_abs_err", "err"), ("error", "error")):
                if name in part:
                    row[f"{lowering}_{runtime}_{key}"] = part[name]
            if run is not None:
                timed[lowering] = run
        for lowering, ms in zip(timed, interleaved_ms(list(timed.values()), runs)):
            row[f"{lowering}_{runtime}_ms"] = ms
        timed = None  # free the sessions before the next runtime loads
    if not keep:
        for path in paths.values():
            path.unlink()


def errors(row) -> str:
    """The row's largest error against eager, and what failed."""
    errs = [v for k, v in row.items() if k.endswith("_err")]
    fails = [f"{k}: {v}" for k, v in row.items() if k.endswith("_error")]
    return f"{max(errs, default=float('nan')):.1e}" + ("  FAILED " + "; ".join(fails) if fails else "")


def write_json(path, rows):
    """After each row, so a run cut short keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=2))


def fmt(v, spec):
    return "-" if v is None else f"{v:{spec}}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--no-dense", action="store_true", help="auto only (the dense lowering needs N^2 memory)")
    args = p.parse_args()
    print(
        f"torch threads {torch.get_num_threads()}; median of {args.runs} runs after {WARMUP} warm-ups, "
        "the lowerings timed in turns"
    )
    print(
        f"{'mask':10s} {'tokens':>6s} {'density':>7s} {'auto table':>20s} {'work':>6s} | "
        + " | ".join(f"{r}: dense ms, auto ms, x" for r in RUNTIMES)
        + " | file MB dense/auto | max err"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mask_name in args.masks:
            for n in args.lengths:
                r = bench(mask_name, n, args.runs, tmp, ("auto",) if args.no_dense else ("dense", "auto"))
                rows.append(r)
                cells = [
                    f"{fmt(r.get(f'dense_{rt}_ms'), '8.2f')} {fmt(r.get(f'auto_{rt}_ms'), '8.2f')} "
                    f"{fmt(r.get(f'{rt}_speedup'), '5.2f')}x"
                    for rt in RUNTIMES
                ]
                print(
                    f"{mask_name:10s} {n:6d} {r['density']:7.1%} {r['auto']:>20s} {r['auto_work']:6.1%} | "
                    + " | ".join(cells)
                    + f" | {fmt(r.get('dense_file_mb'), '.1f')}/{r['auto_file_mb']:.1f} | "
                    + errors(r),
                    flush=True,
                )
                write_json(args.json, rows)


if __name__ == "__main__":
    main()
