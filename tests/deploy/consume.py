"""Run exported files the way a deployment does: through a runtime's or converter's own API or tool, never edgeattn.

usage: python consume.py CONSUMER JOBS.json RESULTS.json

JOBS.json is a list of {"name", "file", "feeds" (an .npz of the inputs), "work" (a scratch folder)}.  For each job
the consumer loads (or converts, then loads) the file, runs the feeds and saves the outputs as work/outputs.npz;
RESULTS.json maps each name to {"outputs": path} or {"error": "what failed"}.  Importing edgeattn is blocked, so a
consumer that needed it would fail here as it would on a device.
"""

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.modules["edgeattn"] = None  # any `import edgeattn` now raises ImportError

import numpy as np  # noqa: E402


def run_onnxruntime(path, feeds, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if session.get_providers()[0] != wanted:  # onnxruntime falls back to the CPU silently
        raise RuntimeError(f"onnxruntime did not enable {wanted}: {session.get_providers()}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_openvino(model, feeds):
    import openvino as ov

    # The one setting docs/deploy/openvino.md asks for: on CPUs with AVX512-BF16 or AMX, OpenVINO runs fp32
    # models in bf16 unless told f32 (errors to 7e-1 on this matrix), and its CPU plugin ignores the hint an IR
    # records.  Nothing else is configured, as in `benchmark_app -infer_precision f32` or a C++ app.
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return {port.get_any_name(): results[port] for port in compiled.outputs}


def ort(job, feeds):
    return run_onnxruntime(job["file"], feeds)


def ort_cuda(job, feeds):
    """onnxruntime-gpu's CUDA provider, TF32 off (its default is on, which rounds fp32 matmuls to 10-bit mantissas
    on Ampere and later GPUs: a precision choice, like fp16, not what an fp32 file promises)."""
    import onnxruntime

    onnxruntime.preload_dlls()  # the CUDA and cuDNN libraries of pip's nvidia-* packages, as onnxruntime's docs say
    return run_onnxruntime(job["file"], feeds, [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])


def ort_format(job, feeds):
    """onnxruntime's converter to the ORT format (mobile and minimal builds), then the .ort file."""
    work = Path(job["work"])
    _tool(
        [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            job["file"],
            "--output_dir",
            str(work / "ort"),
        ]
    )
    stem = Path(job["file"]).stem
    if not (work / "ort" / f"{stem}.required_operators.config").is_file():
        raise RuntimeError("the converter wrote no required_operators.config")
    return run_onnxruntime(work / "ort" / f"{stem}.ort", feeds)


def openvino_read(job, feeds):
    import openvino as ov

    return run_openvino(ov.Core().read_model(job["file"]), feeds)


def openvino_convert(job, feeds):
    import openvino as ov

    return run_openvino(ov.convert_model(job["file"]), feeds)


def ovc(job, feeds):
    """The `ovc` tool to IR (weights kept in fp32: its default FP16 compression is a separate precision)."""
    import openvino as ov

    xml = Path(job["work"]) / "ovc" / "model.xml"
    _tool(
        [
            str(Path(sys.executable).with_name("ovc")),
            job["file"],
            "--output_model",
            str(xml),
            "--compress_to_fp16=False",
        ]
    )
    return run_openvino(ov.Core().read_model(str(xml)), feeds)


def onnxsim(job, feeds):
    import onnx
    import onnxsim as sim

    model, ok = sim.simplify(onnx.load(job["file"]))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    out = Path(job["work"]) / "onnxsim.onnx"
    onnx.save(model, str(out))
    return run_onnxruntime(out, feeds)


def onnxslim(job, feeds):
    import onnx
    import onnxslim as slim

    out = Path(job["work"]) / "onnxslim.onnx"
    onnx.save(slim.slim(job["file"]), str(out))
    return run_onnxruntime(out, feeds)


def onnx2tf(job, feeds):
    """onnx2tf to a float32 TFLite model (inputs kept in the ONNX layout), run with LiteRT by signature names."""
    import onnx

    graph = onnx.load(job["file"], load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    out = Path(job["work"]) / "tflite"
    # -kat: keep every input's ONNX shape (no NCHW -> NHWC); -rtpo Erf: GELU's Erf as builtin ops (no Flex delegate)
    _tool(
        [
            str(Path(sys.executable).with_name("onnx2tf")),
            "-i",
            job["file"],
            "-o",
            str(out),
            "-kat",
            *inputs,
            "-rtpo",
            "Erf",
            "-n",
        ],
        path_first=str(Path(sys.executable).parent),
    )  # it runs `onnxsim` from PATH
    [model] = out.glob("*_float32.tflite")
    return run_tflite(model, feeds, [o.name for o in graph.output])


def run_tflite(model, feeds, output_names):
    """By the signature onnx2tf writes (ONNX names in and out); a model it wrote without one (its fallback converter
    path) is run by tensor order, which is unambiguous only with one input and one output."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model))
    if interpreter.get_signature_list():
        return {k: np.asarray(v) for k, v in interpreter.get_signature_runner()(**feeds).items()}
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1 or len(feeds) != 1 or len(output_names) != 1:
        raise RuntimeError(
            f"the TFLite model has no signature and {len(inputs)} inputs, {len(outputs)} outputs: "
            f"no safe way to map them to the ONNX names"
        )
    interpreter.allocate_tensors()
    interpreter.set_tensor(inputs[0]["index"], next(iter(feeds.values())))
    interpreter.invoke()
    return {output_names[0]: np.array(interpreter.get_tensor(outputs[0]["index"]))}


CONSUMERS = {
    "ort": ort,
    "ort-cuda": ort_cuda,
    "ort-format": ort_format,
    "openvino": openvino_read,
    "openvino-convert": openvino_convert,
    "ovc": ovc,
    "onnxsim": onnxsim,
    "onnxslim": onnxslim,
    "onnx2tf": onnx2tf,
}


def _tool(argv, path_first=None):
    env = dict(os.environ, PATH=f"{path_first}{os.pathsep}{os.environ['PATH']}") if path_first else None
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        # the exception it died of (type and first message line) first: onnx2tf ends with generic advice
        raised = next((i for i, line in enumerate(lines) if re.match(r"\w*(Error|Exception): ", line)), len(lines))
        said = lines[raised : raised + 2] + lines[-3:]
        raise RuntimeError(f"{Path(argv[0]).name} exited {done.returncode}: " + " | ".join(said))


def main():
    consumer, jobs, results = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), {}
    for job in jobs:
        Path(job["work"]).mkdir(parents=True, exist_ok=True)
        feeds = dict(np.load(job["feeds"]))
        start = time.perf_counter()
        try:
            outputs = CONSUMERS[consumer](job, feeds)
            target = Path(job["work"]) / "outputs.npz"
            np.savez(target, **outputs)
            results[job["name"]] = {"outputs": str(target)}
        except Exception as e:  # one line per failure: the matrix shows it
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            results[job["name"]] = {"error": " ".join(last.split())[:400]}
        results[job["name"]]["seconds"] = round(time.perf_counter() - start, 1)  # what each model costs the column
    assert "edgeattn" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    Path(sys.argv[3]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
