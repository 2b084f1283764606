"""One attention block per mask, side by side: torch eager, compiled FlexAttention, the naive dense ONNX export and
edgeattn's exports (every lowering) on onnxruntime and OpenVINO CPU, or the runtimes named.  Compiled FlexAttention
runs in a process of its own (this script, ``--flex-row CASE``): torch.compile's workers slowed every later row
1.5-2x when it shared one.  ``--device cuda`` runs the torch rows (eager, FlexAttention) on the GPU, beside ort-cuda.

    python benchmarks/bench_attention.py --json results.json
    python benchmarks/bench_attention.py --cases na2d-block swin-block --runs 10 --no-flex
    python benchmarks/bench_attention.py --runtimes ort-cuda --device cuda --json gpu.json
    python benchmarks/bench_attention.py --attention-only --cases na2d-block sliding-block

Every row runs the same function (qkv linear -> masked attention -> output projection, the registered block's
weights) on the same input, and is checked against eager.  Columns: median ms over --runs after 3 warm-ups (the
ONNX rows of one runtime timed in turns); "vs naive" = the naive dense version on the same runtime / this row (for
torch rows the naive version is eager SDPA with the dense mask); "vs flex" = compiled FlexAttention / this row;
"x roofline" = this row / the time the exact FLOPs (linears + only the allowed query-key pairs) take at the
measured fp32 GEMM peak; "load s" = loading the file on the runtime; "+peak MB" = the peak resident memory of load
plus the first run above what the process held before (Linux's VmHWM, reset per row); "file MB".  ``--json`` keeps
every figure, with the machine and versions.

``--attention-only`` times the attention alone: q, k, v in (random, (1, heads, N, head dim)), no qkv or output
projection, and a roofline of the allowed pairs' FLOPs alone.  The rows whose label starts with ``kernel`` run the
``--custom-op`` file (blocked table) on OpenVINO with edgeattn-kernels' fused kernel (``pip install
--no-build-isolation ./native``; the row says so when it is not installed).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import edgeattn
from edgeattn import models
from edgeattn.errors import first_line
from edgeattn.export import export_onnx
from edgeattn.layers import split_qkv
from edgeattn.masks import Shape
from edgeattn.registered import export_registered

CASES = ["na2d-block", "na2d-dilated-block", "swin-block", "sliding-block", "causal-block", "na3d-block"]
LOWERINGS = ["auto", "dense", "blocked", "attention", "contrib"]
RUNTIMES = ["ort-cpu", "openvino-cpu"]
WARMUP = 3


def median_ms(fn, runs, sync=lambda: None):
    """``sync``: waits for queued GPU work, so a torch CUDA row times its kernels, not their launch."""
    for _ in range(WARMUP):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_ms(fns, runs, rounds=5, pause_s=0.05):
    """Each function's median ms over ``runs`` runs after 3 warm-ups, taken in turns (``rounds`` rounds of
    runs/rounds each), so that this machine's drift hits every row alike: one after the other, the same file
    differed by 15% between rows.  Each turn starts after a ``pause_s`` pause: the threads of the onnxruntime
    session that ran before keep spinning a while, and without the pause they slowed the next session's runs
    1.3-2.1x (benchmarks/RESULTS.md)."""
    for fn in fns:
        for _ in range(WARMUP):
            fn()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, samples):
            time.sleep(pause_s)
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in samples]


def synchronizer(device):
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def peak_gflops(device="cpu", tries=5):
    """Best fp32 GEMM rate: the denominator of every roofline, so measure it on this machine, once (on a GPU: fp32
    without TF32, as ort-cuda runs here)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 2048 if device == "cpu" else 8192
    a, b, sync = torch.randn(n, n, device=device), torch.randn(n, n, device=device), synchronizer(device)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class Block(nn.Module):
    """qkv -> attention -> proj around any attention function, sharing the registered block's Linear layers so
    every torch row and the naive export compute exactly what edgeattn's exports compute."""

    def __init__(self, attn, attend):
        super().__init__()
        self.qkv, self.proj, self.heads, self.head_dim, self.attend = (
            attn.qkv,
            attn.proj,
            attn.heads,
            attn.head_dim,
            attend,
        )

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = split_qkv(self.qkv(x), self.heads, self.head_dim)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, C))


class Attend(nn.Module):
    """The attention alone: (q, k, v) -> attend(q, k, v)."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v):
        return self.attend(q, k, v)


class NaiveAttend(nn.Module):
    """What users export today: an N x N float additive mask (0 / -inf) as a buffer, shipped in the file (around
    the block's projections: ``Block(attn, NaiveAttend(dense))``)."""

    def __init__(self, dense):
        super().__init__()
        self.register_buffer("bias", torch.zeros(dense.shape).masked_fill(~dense, float("-inf")))

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


def _status_kb(key):
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextlib.contextmanager
def peak_memory(row):
    """Record in ``row`` the peak resident memory the block adds over what the process held before it (MB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kb("VmRSS")
    except OSError:  # not Linux: no per-row peak
        yield
        return
    yield
    row["peak_rss_mb"] = (_status_kb("VmHWM") - before) / 1024


def load_checked(row, path, xs, ref):
    """Load one file on ``row["runtime"]``, run it once on the inputs ``xs`` and record ``load_s`` and
    ``max_abs_err`` against ``ref`` in ``row``; returns a function that runs it again, or None when that failed
    (``row["error"]`` says why: a failure is the row's, not the script's)."""
    try:
        start = time.perf_counter()
        session = edgeattn.load(path, row["runtime"])
        row["load_s"] = time.perf_counter() - start
        feeds = {info.name: x.numpy() for info, x in zip(session.inputs, xs)}
        out = next(iter(session.run(feeds).values()))
        row["max_abs_err"] = float(abs(torch.from_numpy(out) - ref).max())
        return lambda: session.run(feeds)
    except Exception as e:
        row["error"] = first_line(e)
        return None


def load_onnx(rows, timed, name, runtime, path, xs, ref, **extra):
    """Load one file on one runtime and check it; a failure becomes the row's error, not the script's.  The row
    goes to ``rows``, and with the function that runs it to ``timed``, to be timed with the others in turns."""
    row = dict(row=name, runtime=runtime, **extra)
    rows.append(row)
    with peak_memory(row):  # of the load and the first run
        run = load_checked(row, path, xs, ref)
    if run is not None:
        timed.append((row, run))


def time_in_turns(timed, runs):
    """Each runtime's rows timed in turns (:func:`interleaved_ms`), the runtimes one after the other: timed one
    after the other, the same file read 5.28 and 6.59 ms in two rows of one run (benchmarks/RESULTS.md).  A row
    whose run fails gets the error, and the other rows their times."""
    for runtime in dict.fromkeys(row["runtime"] for row, _ in timed):
        group = [(row, guarded(row, run)) for row, run in timed if row["runtime"] == runtime]
        for (row, _), ms in zip(group, interleaved_ms([run for _, run in group], runs)):
            if "error" not in row:
                row["ms"] = ms


def guarded(row, run):
    """``run``, which, once it has failed, records the error in ``row`` and does nothing more."""

    def call():
        if "error" in row:
            return
        try:
            run()
        except Exception as e:
            row["error"] = first_line(e)

    return call


def case_inputs(name, attention_only=False):
    """The registered block's attention, the inputs (the block's tokens, or q, k and v for the attention alone),
    grid, dense mask, the eager module and the eager reference every row is checked against."""
    built = models.build(name, seed=0)
    attn, x, cfg = built.module.attn, built.inputs["tokens"], built.config
    grid = tuple(cfg["grid"]) if cfg.get("grid") else None
    n = x.shape[1]
    dense = edgeattn.materialize(attn.mask, grid=grid) if grid else edgeattn.materialize(attn.mask, q_len=n)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    if attention_only:
        generator = torch.Generator().manual_seed(0)
        xs = tuple(torch.randn(1, attn.heads, n, attn.head_dim, generator=generator) for _ in range(3))
        eager = Attend(sdpa).eval()
    else:
        xs, eager = (x,), Block(attn, sdpa).eval()
    with torch.inference_mode():
        ref = eager(*xs)
    return attn, xs, grid, dense, eager, ref


def flex_row(name, runs, device, attention_only=False):
    """Compiled FlexAttention on one case (run in its own process): the block mask skips empty 128x128 tiles, the
    kernel masks inside the rest."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attn, xs, grid, _, _, ref = case_inputs(name, attention_only)
    n = attn.seq_len
    row = dict(row="flex compiled", runtime=torch_runtime(device))
    try:
        with peak_memory(row):
            mask_mod, _ = attn.mask.mods(Shape.of(grid=grid) if grid else Shape.of(q_len=n))
            block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)

            def attend(q, k, v):
                return flex_attention(q, k, v, block_mask=block_mask)

            block = Attend(attend) if attention_only else Block(attn, attend)
            flex, xs = torch.compile(block.eval().to(device)), [x.to(device) for x in xs]
            with torch.inference_mode():
                start = time.perf_counter()
                out = flex(*xs)  # the first call compiles; its time is reported apart from the medians
                row["compile_s"] = time.perf_counter() - start
                row["max_abs_err"] = float((out.cpu() - ref).abs().max())
                row["ms"] = median_ms(lambda: flex(*xs), runs, synchronizer(device))
    except Exception as e:
        row["error"] = first_line(e)
    return row


def json_of_process(command, failed_row):
    """Run ``command`` (a benchmark's own process); the JSON on the last line it prints, or ``failed_row`` with the
    process's exit status and last error line as its error."""
    proc = subprocess.run(command, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(failed_row, error=f"its process failed (exit {proc.returncode}): {tail}")


def flex_in_subprocess(name, runs, device, attention_only):
    return json_of_process(
        [sys.executable, __file__, "--flex-row", name, "--runs", str(runs), "--device", device]
        + (["--attention-only"] if attention_only else []),
        dict(row="flex compiled", runtime=torch_runtime(device)),
    )


def torch_runtime(device):
    return "torch" if device == "cpu" else f"torch-{device}"


def bench_case(name, args, peak, tmp):
    attn, xs, grid, dense, eager, ref = case_inputs(name, args.attention_only)
    n = attn.seq_len
    allowed = int(dense.sum())
    dim = attn.heads * attn.head_dim
    flops = 4 * attn.heads * attn.head_dim * allowed  # the allowed pairs' q.k and p.v
    if not args.attention_only:
        flops += 2 * n * dim * 3 * dim + 2 * n * dim * dim  # the qkv and output projections
    case = dict(
        case=name,
        attention_only=args.attention_only,
        tokens=n,
        dim=dim,
        heads=attn.heads,
        mask=attn.mask.name,
        allowed_pairs=allowed,
        density=allowed / n**2,
        flops=flops,
        roofline_ms=flops / (peak * 1e9) * 1e3,
        rows=[],
    )
    rows = case["rows"]

    # 1. eager with the dense bool mask: the reference every other row is checked against (on the CPU)
    with torch.inference_mode():
        if args.device == "cpu":
            ms = median_ms(lambda: eager(*xs), args.runs)
            rows.append(dict(row="eager dense", runtime="torch", max_abs_err=0.0, ms=ms))
        else:
            mask, xs_on = dense.to(args.device), [x.to(args.device) for x in xs]

            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            on = (Attend(sdpa) if args.attention_only else Block(attn, sdpa)).to(args.device)
            err = float((on(*xs_on).cpu() - ref).abs().max())
            ms = median_ms(lambda: on(*xs_on), args.runs, synchronizer(args.device))
            rows.append(dict(row="eager dense", runtime=torch_runtime(args.device), max_abs_err=err, ms=ms))
            on.to("cpu")

    # 2. FlexAttention, compiled, in a process of its own
    if not args.no_flex:
        rows.append(flex_in_subprocess(name, args.runs, args.device, args.attention_only))

    # 3. the naive dense export (one self-contained file, so its size is the whole cost of shipping the table)
    timed = []
    path = Path(tmp) / f"{name}-naive.onnx"
    try:
        if not args.runtimes:
            raise LookupError("no runtime named")
        # the exporter reports progress and optional-package notes; only its errors matter here
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            naive = NaiveAttend(dense) if args.attention_only else Block(attn, NaiveAttend(dense))
            torch.onnx.export(naive.eval(), xs, str(path), dynamo=True, opset_version=18, external_data=False)
        for runtime in args.runtimes:
            load_onnx(rows, timed, "naive export", runtime, path, xs, ref, file_mb=path.stat().st_size / 1e6)
    except LookupError:
        pass
    except Exception as e:
        rows.append(dict(row="naive export", runtime="-", error=f"export failed: {first_line(e)}"))

    # 4. edgeattn's export of the registered block, each lowering; contrib is an onnxruntime-only op
    for lowering in LOWERINGS:
        path = Path(tmp) / f"{name}-{lowering}.onnx"
        targets = [r for r in args.runtimes if r.startswith("ort")] if lowering == "contrib" else args.runtimes
        if not targets:
            continue
        try:
            result = export_case(name, attn, xs, path, args, lowering=lowering, runtimes=targets)
        except Exception as e:
            rows.append(dict(row=lowering, runtime="-", error=f"export failed: {first_line(e)}"))
            continue
        chosen = ",".join(sorted({m["lowering"] for m in result.masks}))
        if len(result.masks) > 1:  # one layer: several nodes are the buckets of a bucketed table
            chosen = f"{len(result.masks)} buckets: {chosen}"
        for runtime in targets:
            load_onnx(
                rows,
                timed,
                lowering if lowering != "auto" else f"auto ({chosen})",
                runtime,
                path,
                xs,
                ref,
                lowering=chosen,
                file_mb=result.file_bytes / 1e6,
                table_mb=result.table_bytes / 1e6,
            )
    # 5. the --custom-op file with a blocked table on OpenVINO, its nodes run by edgeattn-kernels' fused kernel
    if "openvino-cpu" in args.runtimes:
        path = Path(tmp) / f"{name}-kernel.onnx"
        row = dict(row="kernel (blocked table)", runtime="openvino-cpu")
        before = os.environ.get("EDGEATTN_KERNELS")
        try:
            result = export_case(name, attn, xs, path, args, lowering="blocked", custom_op=True)
            os.environ["EDGEATTN_KERNELS"] = "1"  # an error row, not the function body, when it is missing
            load_onnx(rows, timed, row["row"], row["runtime"], path, xs, ref, file_mb=result.file_bytes / 1e6)
        except Exception as e:
            rows.append(dict(row, error=first_line(e)))
        finally:
            os.environ.pop("EDGEATTN_KERNELS", None)
            if before is not None:
                os.environ["EDGEATTN_KERNELS"] = before
    time_in_turns(timed, args.runs)
    del timed  # the sessions

    add_ratios(case)
    return case


def export_case(name, attn, xs, path, args, lowering, runtimes=None, custom_op=False):
    """edgeattn's export of the case: the registered block, or its attention alone (q, k, v in)."""
    opset = 23 if lowering == "attention" else 18
    if args.attention_only:
        return export_onnx(
            Attend(attn.table).eval(),
            xs,
            path,
            lowering=lowering,
            opset=opset,
            runtimes=runtimes,
            custom_op=custom_op,
            input_names=["q", "k", "v"],
        )
    return export_registered(name, path, lowering=lowering, opset=opset, runtimes=runtimes, custom_op=custom_op)


def add_ratios(case):
    """Each runtime's naive baseline: eager with the dense mask on torch, the naive export on an ONNX runtime."""

    def ms_of(row, runtime):
        return next((r.get("ms") for r in case["rows"] if r["row"] == row and r["runtime"] == runtime), None)

    flex = next((r.get("ms") for r in case["rows"] if r["row"] == "flex compiled"), None)
    for r in case["rows"]:
        if r.get("ms") is None:
            continue
        naive = ms_of("eager dense" if r["runtime"].startswith("torch") else "naive export", r["runtime"])
        r["vs_naive"] = naive / r["ms"] if naive else None
        r["vs_flex"] = flex / r["ms"] if flex else None
        r["x_roofline"] = r["ms"] / case["roofline_ms"]


def fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(case):
    print(
        f"\n{case['case']}{' (attention alone)' if case.get('attention_only') else ''}: {case['mask']}, "
        f"{case['tokens']} tokens, dim {case['dim']}, {case['heads']} heads, "
        f"{case['density']:.1%} of pairs allowed, roofline {case['roofline_ms']:.3f} ms"
    )
    print(
        f"  {'row':22s} {'runtime':13s} {'ms':>9s} {'vs naive':>9s} {'vs flex':>8s} {'x roofline':>10s} "
        f"{'max_abs_err':>11s} {'load s':>7s} {'+peak MB':>8s} {'file MB':>8s}"
    )
    for r in case["rows"]:
        if "error" in r:
            print(f"  {r['row']:22s} {r['runtime']:13s} FAILED: {r['error'][:120]}")
            continue
        compile_note = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        print(
            f"  {r['row']:22s} {r['runtime']:13s} {r['ms']:9.3f} {fmt(r['vs_naive'], '8.2f', 'x')} "
            f"{fmt(r['vs_flex'], '7.2f', 'x')} {r['x_roofline']:9.1f}x {r['max_abs_err']:11.2e} "
            f"{fmt(r.get('load_s'), '7.2f')} {fmt(r.get('peak_rss_mb'), '8.1f')} {fmt(r.get('file_mb'), '8.2f')}"
            f"{compile_note}"
        )


def summary(case, runtimes):
    lines = []
    for runtime in runtimes:
        auto = next((r for r in case["rows"] if r["row"].startswith("auto") and r["runtime"] == runtime), None)
        if auto is None or auto.get("ms") is None:
            lines.append(f"{case['case']}: auto on {runtime} failed: {auto.get('error') if auto else 'not run'}")
            continue
        lines.append(
            f"{case['case']}: {auto['row']} on {runtime}: {auto['ms']:.2f} ms, "
            f"{fmt(auto['vs_naive'], '.1f', 'x')} vs naive {runtime}, {fmt(auto['vs_flex'], '.1f', 'x')} vs flex, "
            f"{auto['x_roofline']:.1f}x roofline"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--runs", type=int, default=20, help="timed runs per row (median), after 3 warm-ups")
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (each compile takes ~20 s)")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument(
        "--runtimes",
        nargs="*",
        default=RUNTIMES,
        help="ONNX runtimes (default: %(default)s; none named: the torch rows alone)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the torch rows run")
    p.add_argument(
        "--attention-only", action="store_true", help="time the attention alone (q, k, v in, no projections)"
    )
    p.add_argument("--flex-row", choices=CASES, help=argparse.SUPPRESS)  # the FlexAttention row's own process
    args = p.parse_args()
    # Denormals flushed to zero in both processes, as edgeattn.load does while onnxruntime runs: -inf scores make
    # denormals in exp, and a torch user can flush them too (compiled FlexAttention on sliding-block: 11-13 ms
    # without, 7.2-7.6 ms with; benchmarks/RESULTS.md)
    torch.set_flush_denormal(True)
    if args.flex_row:
        print(json.dumps(flex_row(args.flex_row, args.runs, args.device, args.attention_only)))
        return

    peak = peak_gflops(args.device)
    print(f"fp32 GEMM peak on {args.device} (best of 5): {peak:.1f} GFLOP/s, torch threads {torch.get_num_threads()}")
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            cases.append(bench_case(name, args, peak, tmp))
            report(cases[-1])
            if args.json:  # after each case, so a run stopped part-way keeps what it measured
                Path(args.json).write_text(
                    json.dumps(
                        dict(
                            date=time.strftime("%Y-%m-%d %H:%M"),
                            command=" ".join(sys.argv),
                            machine=machine(),
                            peak_gflops=peak,
                            threads=torch.get_num_threads(),
                            runs=args.runs,
                            warmup=WARMUP,
                            versions=versions(),
                            cases=cases,
                        ),
                        indent=2,
                    )
                )
    print()
    for case in cases:
        print(summary(case, args.runtimes))


def machine():
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return dict(cpu=cpu, cores=os.cpu_count(), system=platform.platform())


def versions():
    found = dict(torch=torch.__version__, edgeattn=edgeattn.__version__)
    for package in ("onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            found[package] = __import__(package).__version__
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


if __name__ == "__main__":
    main()
