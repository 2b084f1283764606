"""``edgeattn`` command line: parses arguments and calls one library function per command.

Exit codes: 0 success, 1 parity gate failed (the table shows the numbers), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import bench, conformance, inspection, masks, models, parity, plots, runtimes
from .errors import EdgeAttnError, InvalidArgument
from .export import DEFAULT_OPSET, LOWERING_CHOICES, precision
from .files import atomic_write, check_writable
from .onnxfile import formats
from .registered import export_registered
from .serve import serve
from .version import __version__

DEFAULT_RUNS = 20


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (EdgeAttnError, OSError) as e:  # every refusal is an EdgeAttnError; OSError: files it cannot reach
        print(f"edgeattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeattn: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``edgeattn`` command. After an interrupt it leaves through ``os._exit(130)``, skipping interpreter
    finalization: a CI run once saw the process print "interrupted" and then die by SIGINT (status -2) on its way out,
    so no library's exit-time state may decide the status a shell or a supervisor sees."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def cmd_models(args) -> int:
    width = max(map(len, models.names()))
    for name in models.names():
        print(f"{name:{width}s}  {models.REGISTRY[name].description}")
    return 0


def cmd_masks(args) -> int:
    width = max(map(len, masks.FAMILIES))
    for name, (_, description) in masks.FAMILIES.items():
        print(f"{name:{width}s}  {description}")
    return 0


def cmd_masks_show(args) -> int:
    path = plots.draw_family(
        args.family, args.param or (), grid=args.grid, q_len=args.len, query=args.query, path=args.output
    )
    print(f"wrote {path}")
    return 0


def cmd_runtimes(args) -> int:
    rows = []
    for name in [*runtimes.RUNTIMES, *runtimes.discovered()]:
        runtime = runtimes.get(name)
        reasons = runtime.machine_reasons()
        fp32 = runtime.tolerances.get("fp32")
        rows.append(
            {
                "name": name,
                "available": not reasons,
                "description": runtime.description,
                "why_not": "; ".join(reasons),
                "tolerances": {p: t.describe() for p, t in runtime.tolerances.items()},
            }
        )
        print(
            f"{name:28s} {'available' if not reasons else 'unavailable':11s}  {runtime.description}"
            + (f"; fp32 gate {fp32.describe()}" if fp32 else "")
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    print(
        "any other onnxruntime provider: --runtime ort:<ExecutionProvider>[,key=value...]; any OpenVINO device: "
        "--runtime openvino:<DEVICE>"
    )
    if args.json:
        atomic_write(args.json, (json.dumps(rows, indent=2) + "\n").encode())
    return 0


def cmd_export(args) -> int:
    if not args.check and (args.json or args.runs):
        raise InvalidArgument("--runs and --json apply to the parity check; add --check")
    result = export_registered(
        args.model,
        args.output,
        seed=args.seed,
        opset=args.opset,
        custom_op=args.custom_op,
        format=args.format,
        **_user_inputs(args),
        lowering=args.lowering,
        runtimes=args.runtime,
        dynamic_batch=args.dynamic_batch,
        dtype=args.dtype,
        quantize=args.quantize,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        check=args.check,
        runs=args.runs or DEFAULT_RUNS,
        report=args.json,
        progress=_log,
    )
    return _report(parity.describe(result.path, result.metadata), result.parity) if args.check else 0


def _user_inputs(args) -> dict:
    """``--input`` for a user's model (module:callable); refused for a registered one, which has its own."""
    if not models.user.is_spec(args.model):
        if args.input:
            raise InvalidArgument(
                f"--input is for a model of your own (module:callable); {args.model} has its example inputs"
            )
        return {}
    return {"inputs": models.user.parse_inputs(args.input)}


def cmd_check(args) -> int:
    names = parity.check_available(args.runtime) if args.runtime else None
    results = parity.check_file(
        args.file,
        names,
        runs=args.runs or DEFAULT_RUNS,
        report=args.json,
        progress=lambda n: _log(f"checking on {n} ..."),
        inputs=args.inputs,
        trust_code=args.trust_code,
        source=args.source,
    )
    return _report(parity.describe_check(args.file, results, args.source), results)


def cmd_bench(args) -> int:
    bench.check_outputs(args.json, args.markdown, args.plot)
    names = parity.check_available(args.runtime) if args.runtime else None
    args.model = args.target
    rows = bench.run(
        args.target,
        names,
        args.lowering,
        runs=args.runs or DEFAULT_RUNS,
        seed=args.seed,
        progress=bench.progress_bar(),
        precisions=args.precision,
        forms=args.form,
        inputs=_user_inputs(args).get("inputs"),
        trust_code=args.trust_code,
        source=args.source,
    )
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, args.json)
    if args.markdown:
        bench.write_markdown(rows, args.markdown)
    if args.plot:
        plots.plot_bench(rows, args.plot, title=f"edgeattn bench {args.target}")
    failed = [f"{r.runtime} {r.lowering} {r.form}" for r in rows if r.status not in ("ok", "n/a")]
    if failed:
        print(f"bench: out of tolerance or failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args) -> int:
    if args.json:
        check_writable(args.json)
    if args.plot:
        plots.check_plot(args.file, args.plot)
    info = inspection.inspect_file(args.file)
    print(inspection.format_report(info))
    if args.json:
        atomic_write(args.json, (json.dumps(info, indent=2) + "\n").encode())
    if args.plot:
        print("\n".join(plots.plot_file_tables(args.file, args.plot)))
    return 0


def _report(description: str, results) -> int:
    print(description)
    print(parity.format_table(results))
    failed = [r.runtime for r in results if not r.ok]
    if failed:
        print(f"parity gate FAILED on: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_conformance(args) -> int:
    results = conformance.run(
        args.runtime,
        args.dtype,
        output=args.output,
        report=args.json,
        progress=lambda n: _log(f"probing {n} ..."),
    )
    print(conformance.format_table(results))
    wrong = sorted({f"{r.probe} on {r.runtime}" for r in results if r.status == "wrong"})
    if wrong:
        print(f"conformance: wrong results: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    serve(
        args.file,
        runtime=args.runtime,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_body_mb=args.max_body_mb,
        address=args.address,
        name=args.name,
        log=lambda line: print(line, flush=True),
    )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeattn",
        description="Export masked-attention models to ONNX and check them "
        "on onnxruntime and OpenVINO against PyTorch.",
    )
    p.add_argument("--version", action="version", version=f"edgeattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list reference models").set_defaults(func=cmd_models)
    m = sub.add_parser("masks", help="list mask families; `masks show FAMILY` draws one")
    m.set_defaults(func=cmd_masks)
    show = m.add_subparsers(dest="action", metavar="show").add_parser(
        "show", help="draw a mask: the whole pattern of a sequence, or the keys one query attends on a grid"
    )
    show.add_argument("family", help="mask family (see `edgeattn masks`)")
    show.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a parameter of the family's factory, repeatable: kernel=7, kernel=7x5 or 7,5 (per axis), "
        "causal=true; an unknown one lists the family's parameters",
    )
    show.add_argument("--grid", metavar="HxW", help="token grid, 1-3 axes: 14x14, 8x14x14")
    show.add_argument("--len", type=_positive, metavar="N", help="sequence length (sequence masks)")
    show.add_argument(
        "--query",
        metavar="I|Y,X",
        help="on a 2-D/3-D grid, the query whose keys are drawn: a flat index or coordinates (3,5); "
        "default: coordinate 1 on every axis, one in from the corner, where windows shift",
    )
    show.add_argument("-o", "--output", metavar="FILE.png", help="picture to write (default: <mask name>.png)")
    show.set_defaults(func=cmd_masks_show)
    r = sub.add_parser(
        "runtimes",
        help="list runtimes (the named ones, each onnxruntime provider and OpenVINO device here) and whether "
        "they can run here",
    )
    r.add_argument("--json", metavar="FILE", help="write the list, with each runtime's tolerances, as JSON")
    r.set_defaults(func=cmd_runtimes)

    def user_inputs(cmd):
        cmd.add_argument(
            "--input",
            action="append",
            metavar="NAME=SHAPE[:DTYPE]",
            help="an input of your own model, repeatable, in forward()'s order: x=1x3x224x224, "
            "input_ids=1x128:int64 (floats normal, integers in [0, 100), from --seed)",
        )

    def trust_code(cmd):
        cmd.add_argument(
            "--trust-code",
            action="store_true",
            help="a file exported from your own model (module:callable): import and run that code to "
            "rebuild the PyTorch reference (default: its runtimes are compared with each other)",
        )

    def source(cmd):
        cmd.add_argument(
            "--source",
            metavar="FILE.onnx",
            help="the edgeattn file the given file was converted from (a .tflite from onnx2tf carries no "
            "metadata): its metadata names the PyTorch reference",
        )

    def gate_options(cmd, targets=""):
        cmd.add_argument(
            "--runtime",
            action="append",
            metavar="NAME",
            help=f"runtime {targets}to check on, repeatable ({', '.join(runtimes.runtime_names())}, "
            "ort:<ExecutionProvider>[,key=value...], openvino:<DEVICE>); default: torch and every available "
            "ONNX runtime",
        )
        cmd.add_argument(
            "--runs", type=_positive, help=f"timed runs per runtime after 3 warm-ups (default {DEFAULT_RUNS})"
        )
        cmd.add_argument("--json", metavar="FILE", help="write the parity results as a JSON list")

    e = sub.add_parser(
        "export",
        help="export a reference model to ONNX, OpenVINO IR, the ORT format or a model "
        "server repository (Triton, OpenVINO Model Server)",
    )
    e.add_argument(
        "model",
        help="registered model name (see `edgeattn models`), or your own model as "
        "package.module:callable or path/to/file.py:callable (an nn.Module, or a function "
        "returning one; FlexAttention, NATTEN and transformers attention are converted)",
    )
    user_inputs(e)
    e.add_argument(
        "-o",
        "--output",
        required=True,
        help="output path: .onnx, .xml (OpenVINO IR, with its .bin) or .ort (ORT format); a folder "
        "for --format triton or ovms",
    )
    e.add_argument(
        "--format",
        choices=[*formats.FORMATS, *formats.REPOSITORIES],
        help="onnx, openvino (IR) or ort (onnxruntime mobile/minimal builds, with its "
        "required_operators.config); triton: a Triton model repository (ONNX for the onnxruntime "
        "backend; IR for the openvino backend with --runtime openvino-cpu); ovms: an OpenVINO Model "
        "Server repository with its config.json; default: from the output's suffix",
    )
    e.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; 22 for --dtype bf16)")
    e.add_argument(
        "--custom-op",
        action="store_true",
        help="keep each attention as one edgeattn-domain node whose function body is its standard ops "
        "(onnxruntime runs it; OpenVINO and converters need edgeattn's loader); default: standard "
        "ops only, which any runtime or converter reads",
    )
    e.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)  # the default since custom ops went opt-in
    e.add_argument(
        "--lowering",
        choices=LOWERING_CHOICES,
        default="auto",
        help="attention body: auto (per layer, from the mask's sparsity and the target runtimes), dense, "
        "blocked, attention (opset >= 23) or contrib (onnxruntime only); default auto",
    )
    e.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="make the batch axis of every input symbolic (the mask tables do not depend on it)",
    )
    e.add_argument(
        "--dtype",
        choices=list(precision.DTYPES),
        default="fp32",
        help="precision of weights and compute; inputs and outputs stay float32 (default fp32)",
    )
    e.add_argument(
        "--quantize",
        choices=precision.QUANTIZE,
        help="int8 linear layers with onnxruntime (attention stays float): int8 = dynamic, "
        "int8-static = QDQ calibrated on --calibration or generated inputs",
    )
    e.add_argument(
        "--calibration",
        metavar="FILE.npz",
        help="int8-static calibration inputs: one array per model input, samples stacked on a new "
        "leading axis (default: --calibration-samples inputs drawn like the example inputs)",
    )
    e.add_argument(
        "--calibration-samples",
        type=_positive,
        default=precision.DEFAULT_CALIBRATION_SAMPLES,
        help=f"generated calibration samples (default {precision.DEFAULT_CALIBRATION_SAMPLES})",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the random weights and example inputs (default 0)")
    e.add_argument(
        "--check", action="store_true", help="run the parity gate on each runtime; exit 1 if out of tolerance"
    )
    gate_options(e, targets="the file is for (auto picks lowerings they all run) and ")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="time a model with every lowering (or a file) on each runtime, in one table")
    b.add_argument(
        "target",
        metavar="MODEL_OR_FILE",
        help="registered model name, your own model (module:callable, with --input) or a file from "
        "`edgeattn export` (.onnx, .xml, .ort)",
    )
    user_inputs(b)
    trust_code(b)
    b.add_argument(
        "--runtime",
        action="append",
        metavar="NAME",
        help="ONNX runtime to time, repeatable; default: every available one",
    )
    b.add_argument(
        "--lowering",
        action="append",
        choices=LOWERING_CHOICES,
        help="lowering to export and time, repeatable (models only); default: all",
    )
    b.add_argument(
        "--precision",
        action="append",
        choices=bench.PRECISIONS,
        help="precision to export and time, repeatable (models only): fp32, fp16, bf16, int8 (dynamic), "
        "int8-static; default fp32 (with a precision named, lowerings default to auto)",
    )
    b.add_argument(
        "--form",
        action="append",
        choices=bench.FORMS,
        help="form to export and time, repeatable (models only): standard (the default export) or "
        "custom-op (--custom-op); default: both, side by side",
    )
    b.add_argument("--runs", type=_positive, help=f"timed runs per row after 3 warm-ups (default {DEFAULT_RUNS})")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    source(b)
    b.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    b.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    b.add_argument("--plot", metavar="FILE.png", help="write a latency bar chart (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="list a file's ops, opsets, custom domains, initializer and mask-table bytes")
    i.add_argument("file", help="an .onnx file or OpenVINO IR .xml")
    i.add_argument("--json", metavar="FILE", help="write the report as JSON")
    i.add_argument(
        "--plot",
        metavar="DIR",
        help="draw each static mask table stored in the .onnx file as a PNG in DIR (needs matplotlib)",
    )
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("check", help="compare a file on runtimes with its PyTorch reference, or with each other")
    c.add_argument(
        "file",
        help="an .onnx, .xml, .ort or .tflite file: one from `edgeattn export` is compared with the PyTorch "
        "model its metadata names; any other (e.g. exported from Python) on each runtime with "
        "the first (ort-cpu when available)",
    )
    c.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="inputs to feed, one array per input name (numpy.savez(FILE, name=array, ...)); default: "
        "the model's example inputs, or generated ones (normal floats, small ints, batch 1)",
    )
    source(c)
    trust_code(c)
    gate_options(c)
    c.set_defaults(func=cmd_check)

    k = sub.add_parser(
        "conformance",
        help="run small probe files, each pinning one semantic of masked attention, on each runtime against PyTorch",
    )
    k.add_argument(
        "--runtime",
        action="append",
        metavar="NAME",
        help="runtime to probe, repeatable (a name from `edgeattn runtimes`, ort:<ExecutionProvider>[,key=value...], "
        "openvino:<DEVICE>); default: every available ONNX runtime",
    )
    k.add_argument(
        "--dtype",
        action="append",
        choices=["fp32", "fp16", "bf16"],
        help="run the probes of these precisions, repeatable (default: all three)",
    )
    k.add_argument("-o", "--output", metavar="DIR", help="keep the probe files in DIR (to check them elsewhere)")
    k.add_argument("--json", metavar="FILE", help="write the results as a JSON list")
    k.set_defaults(func=cmd_conformance)

    s = sub.add_parser(
        "serve",
        help="serve a file with Ray Serve over the KServe v2 REST protocol (as Triton and "
        "OpenVINO Model Server), batching requests, until Ctrl-C",
    )
    s.add_argument("file", help="an .onnx, .xml or .ort file")
    s.add_argument("--runtime", default="auto", help="runtime the replicas load the file on (default: auto)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    s.add_argument("--port", type=_positive, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--replicas", type=_positive, default=1, help="copies of the model, each with a CPU (default 1)")
    s.add_argument(
        "--max-batch-size",
        type=_positive,
        default=8,
        help="requests run together at most (default 8); a file exported with --dynamic-batch runs them as one batch",
    )
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    s.add_argument(
        "--max-body-mb",
        type=float,
        default=256.0,
        help="the largest request body in MiB (default 256); a larger one gets a 400",
    )
    s.add_argument(
        "--address",
        help="a running Ray cluster to deploy on (auto: the one `ray start` joined here); "
        "default: start Ray on this machine",
    )
    s.add_argument("--name", help="model name in the URLs (default: the registered model's name, or model)")
    s.set_defaults(func=cmd_serve)
    return p


if __name__ == "__main__":
    run()
