"""Greedy generation from exported prefill.onnx + decode.onnx with plain onnxruntime and plain OpenVINO only.

usage: python plain_generate.py FOLDER PROMPT.npy STEPS OUT.json

Writes {"onnxruntime": {"tokens": [...], "logits": path, "steps": path}, "openvino": {...}}: the generated tokens,
the prefill's logits and the logits each token was chosen from (.npy: prefill's last position, then each decode
step's, stacked: (steps, 1, vocab)).  Importing edgeattn is blocked, as on a device that does not have it.
"""

import json
import sys
from pathlib import Path

sys.modules["edgeattn"] = None  # any `import edgeattn` now raises ImportError

import numpy as np  # noqa: E402


def onnxruntime_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return names, lambda feeds: session.run(None, feeds)


def openvino_runner(path):
    import openvino as ov

    # f32: a CPU with AVX512-BF16 would otherwise run this fp32 file in bf16
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [port.get_any_name() for port in compiled.inputs]

    def run(feeds):
        results = compiled(feeds)
        return [results[port] for port in compiled.outputs]

    return names, run


def generate(runner, folder: Path, prompt: np.ndarray, steps: int):
    _, prefill = runner(folder / "prefill.onnx")
    names, decode = runner(folder / "decode.onnx")
    logits, *cache = prefill({"input_ids": prompt})
    chosen_from = [logits[:, -1]]
    tokens = [int(logits[0, -1].argmax())]
    for step in range(steps - 1):
        feeds = {
            "input_ids": np.array([[tokens[-1]]], dtype=np.int64),
            "cache_position": np.array([prompt.shape[1] + step], dtype=np.int64),
        }
        feeds.update(zip(names[2:], cache))  # past_key_values.N.key/value, in the order present.* came out
        out, *cache = decode(feeds)
        chosen_from.append(out[:, -1])
        tokens.append(int(out[0, -1].argmax()))
    return tokens, logits, np.stack(chosen_from)


def main():
    folder, prompt, steps, out = Path(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    results = {}
    for name, runner in (("onnxruntime", onnxruntime_runner), ("openvino", openvino_runner)):
        tokens, logits, chosen_from = generate(runner, folder, prompt, steps)
        np.save(out.with_name(f"{name}_logits.npy"), logits)
        np.save(out.with_name(f"{name}_steps.npy"), chosen_from)
        results[name] = {
            "tokens": tokens,
            "logits": str(out.with_name(f"{name}_logits.npy")),
            "steps": str(out.with_name(f"{name}_steps.npy")),
        }
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
