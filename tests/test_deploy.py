"""The deployment matrix: every registered model, in each form edgeattn writes, through each runtime and converter a
deployment uses, in a subprocess that never imports edgeattn (tests/deploy/consume.py), against the torch reference.

Forms: ``default`` (standard ops; ``--inline`` writes the same bytes, see test_cli), ``custom-op`` (``--custom-op``)
and ``ir`` (OpenVINO IR, the writer behind ``--format openvino``).  The custom-op form is for onnxruntime and
tools that keep model-local functions; OpenVINO and onnx2tf read the default file or the IR.

onnxsim 0.4.36 and onnx2tf run from their own virtual environment (onnx2tf pins TensorFlow and older onnx and
onnxruntime): ``$EDGEATTN_ONNX2TF_VENV``, default ``.venv-onnx2tf`` at the repository root (``pip install
onnx2tf==1.29.24``).  Those columns are marked ``onnx2tf`` and deselected by default (TFLite conversion takes
minutes per model): ``pytest -m onnx2tf tests/test_deploy.py`` runs them, and `.ci/run` runs them as a second job
alongside the rest of the suite.  Without the venv they skip, unless ``EDGEATTN_REQUIRE_ONNX2TF=1`` (CI).
The registered models run at full size through onnxruntime and OpenVINO (:data:`FULL_SIZE`); the converter columns
take the six large models at a reduced depth (``conftest.REDUCED_CONFIGS``: every stage and every kind of block kept,
fewer blocks per stage: the same ops and layouts, a third of the nodes), since a conversion's correctness does not
depend on depth and onnx2tf takes 8 to 15 minutes per full-size ImageNet model here.  ``EDGEATTN_FULL_SIZE=1`` runs
every column at full size.  The onnx2tf column leaves out dinat-mini and swin-t, whose kinds of block other models
bring it (:data:`ONNX2TF_COVERED`); ``EDGEATTN_ONNX2TF_ALL=1`` converts them too.
The ``ort-cuda`` column (plain onnxruntime-gpu, TF32 off) is marked ``gpu``: it skips without a CUDA GPU.
``EDGEATTN_DEPLOY_MATRIX=FILE`` appends each column's max errors to FILE as JSON lines.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeattn import models
from edgeattn.export.writers import write_openvino_ir
from edgeattn.onnxfile import read_metadata

from conftest import REDUCED_CONFIGS, judge_modulo_ties, require

ROOT = Path(__file__).resolve().parents[1]
CONSUME = Path(__file__).with_name("deploy") / "consume.py"
ATOL = 1e-4  # fp32 against torch, for every consumer (onnxruntime's and OpenVINO's fp32 gate; onnx2tf's target;
# ort-cuda with TF32 off, every registered model well inside it on an H200: benchmarks/RESULTS.md, 2026-11-30
# (onnxruntime CUDA, first run))
# The edgeattn runtime on each consumer's engine: a file with declared hard decisions (mask2former-decoder's mask
# threshold) that misses ATOL is judged as `edgeattn check` judges it, modulo decisions that flipped at a tie, with
# the flipped decisions read from that runtime (conftest.judge_modulo_ties).  onnx2tf's LiteRT has none: plain ATOL.
ENGINES = {
    **dict.fromkeys(("ort", "ort-format", "onnxsim", "onnxslim"), "ort-cpu"),
    "ort-cuda": "ort-cuda",
    **dict.fromkeys(("openvino", "openvino-convert", "ovc"), "openvino-cpu"),
}
O2T_VENV = Path(os.environ.get("EDGEATTN_ONNX2TF_VENV", ROOT / ".venv-onnx2tf"))

# the columns that run the registered models at full size; the others (converters, and files kept for tools) take
# the large ones at REDUCED_CONFIGS (tests/conftest.py)
FULL_SIZE = {("ort", "default"), ("openvino", "default"), ("ort-cuda", "default")}
# (consumer, form, python): the consumers each form is for
MATRIX = [
    *[
        (c, "default", "main")
        for c in ("ort", "ort-format", "openvino", "openvino-convert", "ovc", "onnxsim", "onnxslim")
    ],
    ("onnxsim", "default", "onnx2tf-venv"),
    ("onnx2tf", "default", "onnx2tf-venv"),
    *[(c, "custom-op", "main") for c in ("ort", "ort-format", "onnxsim", "onnxslim")],
    ("openvino", "ir", "main"),
    ("ort-cuda", "default", "main"),  # marked gpu: needs onnxruntime-gpu and a CUDA GPU
]
# Cells that fail for a reason outside edgeattn, checked to still fail with the error recorded (a fix upstream, or a
# failure of another kind, turns the test red): consumer, model -> (a regex every failure line of the model matches,
# why)
KNOWN_FAILURES = {
    ("onnx2tf", "segment-lm-decode"): (
        r"onnx2tf exited 1: ValueError: .*\| Dimensions must be equal, but are 128 "
        r"and 32 .*with input shapes: \[1,1,1,128\], \[1,2,1,32\]",
        "onnx2tf 1.29.24 moves the decode step's masks computed from `position` "
        "(B, 1, max_cache, 1) to NHWC but not the caches they select from",
    ),
    # the routed lowering's ScatterElements come out of onnx2tf with the shape of another ScatterElements of the
    # graph (its own check, -cotof, reports (2, 769) for (2, 513)); LiteRT then gathers out of bounds
    **{
        ("onnx2tf", name): (
            r"RuntimeError: gather index out of bounds ?Node number \d+ \(GATHER\) failed to invoke",
            "onnx2tf 1.29.24 gives the routed lowering's ScatterElements wrong shapes",
        )
        for name in ("moba-block", "moba-lm")
    },
}
# onnx2tf takes minutes per large model (per-model seconds: RESULTS.md, 2026-12-07 (issue 32): CI time): its column
# skips the two slowest, whose blocks it converts in the models named; EDGEATTN_ONNX2TF_ALL=1 converts them too.
ONNX2TF_COVERED = {
    "dinat-mini": "nat-mini (NAT blocks with relative position bias) and nat-tiny (dilated neighborhoods)",
    "swin-t": "swin-tiny-block (window and shifted-window blocks) and nat-mini (a relative position bias gathered "
    "through the mask table); not its patch merging",
}
PARAMS = [
    pytest.param(
        c,
        f,
        p,
        id=f"{c}-{f}{'-o2t' if p != 'main' else ''}",
        marks=[pytest.mark.onnx2tf] if p != "main" else [pytest.mark.gpu] if c == "ort-cuda" else [],
    )
    for c, f, p in MATRIX
]


def _python(which: str) -> str:
    if which == "main":
        return sys.executable
    python = O2T_VENV / "bin" / "python"
    if not python.is_file():
        if os.environ.get("EDGEATTN_REQUIRE_ONNX2TF") == "1":
            pytest.fail(
                f"{python} is missing: build it with `python3 -m venv {O2T_VENV} && "
                f"{O2T_VENV}/bin/pip install onnx2tf==1.29.24` (.ci/run does)"
            )
        pytest.skip(f"no onnx2tf environment at {O2T_VENV} (see this module's docstring)")
    return str(python)


class Artifacts:
    """Each registered model's feeds and torch outputs, and its file in each form, made when first asked for (the
    exported files shared with the rest of the run through ``registered_file``); ``config``: the model built with
    these overrides instead."""

    def __init__(self, root: Path, registered_file):
        self.root, self.cache, self.registered_file = root, {}, registered_file

    def model(self, name: str, config: dict) -> dict:
        key = (name, json.dumps(config, sort_keys=True))
        if key not in self.cache:
            folder = self.root / f"{name}{'-reduced' if config else ''}"
            folder.mkdir()
            built = models.build(name, **config)
            with torch.no_grad():
                reference = torch.utils._pytree.tree_leaves(built.module(**built.inputs))
            np.savez(folder / "feeds.npz", **{k: v.numpy() for k, v in built.inputs.items()})
            self.cache[key] = {
                "folder": folder,
                "feeds": folder / "feeds.npz",
                "config": config,
                "reference": dict(zip(built.outputs, (t.numpy() for t in reference))),
            }
        return self.cache[key]

    def file(self, name: str, form: str, config: dict) -> Path:
        entry = self.model(name, config)
        if form not in entry:
            folder = entry["folder"]
            if form == "default":
                entry[form] = self.registered_file(name, **config)
            elif form == "custom-op":
                entry[form] = self.registered_file(name, custom_op=True, **config)
            else:  # the IR writer behind --format openvino, on the custom-op file (no second trace)
                proto = onnx.load(str(self.file(name, "custom-op", config)))
                entry[form] = folder / "ir.xml"
                write_openvino_ir(proto, entry[form], {**read_metadata(proto), "format": "openvino"})
        return entry[form]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, registered_file):
    return Artifacts(tmp_path_factory.mktemp("deploy"), registered_file)


@pytest.mark.parametrize("consumer, form, python", PARAMS)
def test_deployment_matrix(artifacts, tmp_path, consumer, form, python):
    if consumer == "ort-cuda":
        require("ort-cuda")
    python = _python(python)
    names = [
        n
        for n in models.names()
        if consumer != "onnx2tf" or n not in ONNX2TF_COVERED or os.environ.get("EDGEATTN_ONNX2TF_ALL") == "1"
    ]
    configs = {name: {} if (consumer, form) in FULL_SIZE else REDUCED_CONFIGS.get(name, {}) for name in names}
    jobs = [
        {
            "name": name,
            "file": str(artifacts.file(name, form, configs[name])),
            "feeds": str(artifacts.model(name, configs[name])["feeds"]),
            "work": str(tmp_path / name),
        }
        for name in names
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [python, str(CONSUME), consumer, str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=3000,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    errors, failures = {}, []
    for name in names:
        result, a = results[name], artifacts.model(name, configs[name])
        if "error" in result:
            errors[name] = result["error"]
            failures.append(f"{name}: {result['error']}")
            continue
        got = dict(np.load(result["outputs"]))
        missing = sorted(set(a["reference"]) - set(got))
        if missing:
            errors[name] = f"outputs {missing} missing (got {sorted(got)})"
            failures.append(f"{name}: {errors[name]}")
            continue
        worst = 0.0
        for output, want in a["reference"].items():
            have = got[output]
            if have.shape != want.shape or not np.isfinite(have).all():
                worst = float("inf")
                failures.append(f"{name} {output}: shape {have.shape} (want {want.shape}) or non-finite values")
                continue
            worst = max(worst, float(np.abs(have.astype(np.float64) - want).max()))
        ok, ties = worst <= ATOL, ""
        if not ok and worst < float("inf") and consumer in ENGINES:
            built = models.build(name, **configs[name])
            ok, worst, ties = judge_modulo_ties(
                got,
                a["reference"],
                built.module,
                built.inputs,
                artifacts.file(name, form, configs[name]),
                ENGINES[consumer],
            )
        errors[name] = worst
        if not ok:
            failures.append(f"{name}: max abs error {worst:.2e}, gate {ATOL:.0e}{' (' + ties + ')' if ties else ''}")
    for (known_consumer, name), (recorded, why) in KNOWN_FAILURES.items():
        if known_consumer != consumer:
            continue
        failed = [f for f in failures if f.startswith(f"{name}:") or f.startswith(f"{name} ")]
        if not failed:
            failures.append(f"{name}: passes now; remove it from KNOWN_FAILURES ({why})")
        elif not all(re.search(recorded, f) for f in failed):
            failures.append(f"{name}: fails otherwise than recorded in KNOWN_FAILURES ({recorded!r}: {why})")
            continue
        for f in failed:
            failures.remove(f)
        errors[name] = f"known failure: {why}"
    report = os.environ.get("EDGEATTN_DEPLOY_MATRIX")
    if report:
        label = (
            consumer
            + (" (onnx2tf venv)" if python != sys.executable else "")
            + (" (large models reduced)" if any(configs.values()) else "")
        )
        with open(report, "a") as f:
            f.write(json.dumps({"consumer": label, "form": form, "errors": errors}) + "\n")
    assert not failures, f"{consumer} on {form} files:\n" + "\n".join(failures)


@pytest.mark.parametrize("form", ["default", "custom-op"])
def test_files_pass_onnx_full_check_and_strict_shape_inference(artifacts, form):
    """What onnx's own tools say of every model's file (the matrix above exported them already)."""
    for name in models.names():
        model = onnx.load(str(artifacts.file(name, form, REDUCED_CONFIGS.get(name, {}))))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        assert not any(f.overload for f in model.functions), name  # converters drop or merge overloads
        # constants are tensor values (onnxsim 0.4.36 and onnx2tf read no other form), except a function's scale,
        # which refers to its node's attribute until inlined
        for graph in [model.graph, *model.functions]:
            for node in (n for n in graph.node if n.op_type == "Constant"):
                [attribute] = node.attribute
                assert attribute.name == "value" or attribute.ref_attr_name == "scale", (name, attribute.name)
        if form == "default":
            assert not model.functions and all(n.domain in ("", "ai.onnx") for n in model.graph.node), name
