"""Generation from an export_lm folder with lmloop.py carried alone, over plain onnxruntime and plain OpenVINO.

usage: python plain_generate.py FOLDER PROMPTS_JSON STEPS

Prints {"onnxruntime": [[prompt + tokens], ...], "openvino": [...]} (greedy).  lmloop.py is loaded from its file
with importing edgeattn blocked, as on a device that has only that file, numpy and a runtime.
"""

import importlib.util
import json
import sys
from pathlib import Path

sys.modules["edgeattn"] = None  # any `import edgeattn` now raises ImportError

LMLOOP = Path(__file__).resolve().parents[2] / "edgeattn" / "lmloop.py"
spec = importlib.util.spec_from_file_location("lmloop", LMLOOP)
lmloop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lmloop)


def openvino_runs(folder: Path):
    import openvino as ov

    def run(path):
        # f32: a CPU with AVX512-BF16 would otherwise run this fp32 file in bf16
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        names = [port.get_any_name() for port in compiled.outputs]
        return lambda feeds: dict(zip(names, request.infer(feeds).values()))

    return run(folder / "prefill.onnx"), run(folder / "decode.onnx")


def main():
    folder, prompts, steps = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    config = lmloop.read_config(folder)
    results = {
        name: lmloop.generate(*runs(folder), config, prompts, steps)
        for name, runs in (("onnxruntime", lmloop.onnxruntime_runs), ("openvino", openvino_runs))
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
