"""The conformance table of benchmarks/RESULTS.md from `edgeattn conformance --json` files (one per venv: the
onnxruntime-openvino provider runs in a venv of its own).

    edgeattn conformance --runtime ort-cpu --runtime openvino-cpu --runtime openvino:AUTO \\
        --runtime openvino:HETERO:CPU --json main.json
    .venv-ort-openvino/bin/python -m edgeattn conformance \\
        --runtime ort:OpenVINOExecutionProvider,device_type=CPU --json ovep.json
    python benchmarks/conformance_table.py main.json ovep.json
"""

import json
import sys


def main(paths):
    rows = [row for path in paths for row in json.loads(open(path).read())]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    cells = {(r["probe"], r["runtime"]): r for r in rows}
    print("| probe | " + " | ".join(f"`{r}`" for r in runtimes) + " |")
    print("|---|" + "---|" * len(runtimes))
    for probe in dict.fromkeys(r["probe"] for r in rows):
        shown = []
        for runtime in runtimes:
            cell = cells.get((probe, runtime))
            error = cell and cell["max_abs_err"]
            shown.append("-" if cell is None else cell["status"] + (f" {error:.1e}" if error is not None else ""))
        print(f"| {probe} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
