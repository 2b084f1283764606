import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from edgeattn import decisions, parity, runtimes
from edgeattn.onnxfile import formats
from edgeattn.registered import export_registered

CPU_RUNTIMES = ["ort-cpu", "openvino-cpu"]
# lowering -> (opset, target runtimes) it is exported and checked with
LOWERING_CASES = {"dense": (18, None), "blocked": (18, None), "attention": (23, None), "contrib": (18, ["ort-cpu"])}
LOWERING_LIST = [(name, *case) for name, case in sorted(LOWERING_CASES.items())]


# The large registered models with fewer blocks per stage (every stage and every kind of block kept: the same ops
# and layouts, a third of the nodes), for tests whose property does not depend on depth: the deployment matrix's
# converter columns and the zoo's batch and precision targets.  EDGEATTN_FULL_SIZE=1 runs them at full size.
REDUCED_CONFIGS = (
    {}
    if os.environ.get("EDGEATTN_FULL_SIZE") == "1"
    else {
        "dinat-mini": {"depths": [2, 2, 2, 2], "dilations": [[1, 8], [1, 4], [1, 2], [1, 1]]},
        "nat-mini": {"depths": [1, 1, 1, 1]},
        "ppma-t": {"depths": [1, 1, 1, 1]},
        "rmt-t": {"depths": [1, 1, 1, 1]},
        "swin-t": {"depths": [2, 2, 2, 2]},
        "mask2former-decoder": {"dec_layers": 3},
    }
)


def max_abs_error(got, reference) -> float:
    """Largest |got - reference| over the reference's outputs; inf where NaN/inf do not match."""
    metrics = parity.compare(reference, got)
    return float("inf") if metrics["nonfinite"] else metrics["max_abs_err"]


def judge_modulo_ties(got, reference, module, inputs, path, runtime) -> tuple[bool, float, str]:
    """Whether outputs ``got`` of the fp32 file ``path`` (run by ``runtime``, or by a deployment of that file on the
    same engine) match the torch ``reference`` (``module(**inputs)`` by output name) within ``runtime``'s fp32
    tolerance, judged as the parity gate judges them (edgeattn/parity.py, modulo_ties): plainly, or else modulo
    the file's declared hard decisions (edgeattn/decisions.py) that came out the other way at a tie.
    Mask2Former's ``sigmoid(mask logits) < 0.5`` is one: a logit within rounding of 0 can land on the other side on
    a runtime and move outputs past the fp32 tolerance (one such decision on OpenVINO: commit 250468c).
    ``runtime`` then runs the file again returning the compared tensors, the reference is re-run
    taking its decision wherever both values lie within ``decision_eps`` of the threshold, and ``got`` must match
    that re-run within the same tolerance, with no decision that differs at a larger margin.
    Returns (ok, the max abs error judged, what the tie analysis found)."""
    tolerance = runtimes.get(runtime).tolerance("fp32")
    plain = max_abs_error(got, reference)
    declared = formats.header(path).metadata.get("decisions") or []
    if plain <= tolerance.atol or not declared:
        return plain <= tolerance.atol, plain, ""
    session = _observing(str(path), runtime, tuple(d["tensor"] for d in declared))
    observed = session.run({k: v.numpy() for k, v in inputs.items()})
    ledger = decisions.Ledger([observed[d["tensor"]] for d in declared], tolerance.decision_eps)
    with ledger, torch.no_grad():
        retaken = torch.utils._pytree.tree_leaves(module(**inputs))
    error = max_abs_error(got, dict(zip(reference, (t.numpy() for t in retaken))))
    note = f"{ledger.summary()}; with those taken from {runtime}, max abs err {error:.2e} (without: {plain:.2e})" + (
        f"; not ties: {ledger.large} decisions differ at margins up to {ledger.largest_flip:.1e}"
        if ledger.large
        else ""
    )
    return error <= tolerance.atol and not ledger.large, error, note


@functools.lru_cache(maxsize=2)  # one file is judged at several batch sizes, or for several consumers
def _observing(path: str, runtime: str, tensors: tuple):
    return runtimes.get(runtime).load(path, observe=tensors)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require(name: str):
    """Skip (with the runtime's own reason) when a runtime cannot run on this machine."""
    reasons = runtimes.get(name).not_supported_reasons()
    if reasons:
        pytest.skip(f"{name} unavailable: {'; '.join(reasons)}")


# Registered models exported once per test run and shared: by the xdist workers and by the onnx2tf job (.ci/run
# points both at one folder with EDGEATTN_TEST_EXPORTS; without it, one folder per run).  A file is written under a
# lock, so a second process wanting it waits for it instead of exporting it again; tests treat these files as
# read-only.
def _exports_folder(tmp_path_factory) -> Path:
    if os.environ.get("EDGEATTN_TEST_EXPORTS"):
        return Path(os.environ["EDGEATTN_TEST_EXPORTS"])
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "registered-exports"


@pytest.fixture(scope="session")
def registered_file(tmp_path_factory):
    """``registered_file(name, **options)``: the path of ``export_registered(name, path, **options)``, exported once
    per run (see above)."""
    root = _exports_folder(tmp_path_factory)

    def get(name: str, **options) -> Path:
        key = hashlib.sha256(json.dumps([name, options], sort_keys=True).encode()).hexdigest()[:16]
        folder = root / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.onnx"
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not path.exists():  # export_registered writes atomically: present means complete
                export_registered(name, path, **options)
        return path

    return get


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``-n N --dist loadgroup`` (the README's test command), xdist sends each xdist_group to one worker by a
    suffix it adds to the test ids; a pytest that ignores the suffix would run the serial group's tests on several
    workers at once."""
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getoption("dist", None) == "loadgroup":
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist's loadgroup does not group with this pytest ({lost[0]} has no group suffix); "
                f"install the versions pyproject.toml's test extra allows"
            )


def external_data_file(folder):
    """A plain torch.onnx.export file whose weight lives in model.onnx.data beside it (the exporter's default)."""
    import onnx
    import torch

    model = torch.nn.Linear(512, 256).eval()  # large enough for the exporter to move its weight out
    path = folder / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 512),), str(path), dynamo=True, external_data=True, input_names=["x"])
    proto = onnx.load(str(path), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    return model, path


def relocate_external_data(path, location):
    """Point every external-data tensor of ``path`` at ``location``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


# CI (.ci/run exports CI=1): a skipped test fails the run unless it is a GPU one (marked gpu, or skipped for a reason
# that names CUDA or a GPU).  CI installs every other runtime and package the tests import or require, so another
# skip means one went missing.  The offending tests and reasons are listed at the end.  Under xdist the controller,
# which sees every worker's reports, keeps the list.
class _SkipsFailCI:
    def __init__(self):
        self.skips = []

    def _note(self, report):
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "gpu" not in getattr(report, "keywords", {}) and not any(w in reason.lower() for w in ("cuda", "gpu")):
            self.skips.append(f"{report.nodeid}: {reason}")

    def pytest_collectreport(self, report):  # a module-level pytest.importorskip
        self._note(report)

    def pytest_runtest_logreport(self, report):
        self._note(report)

    def pytest_sessionfinish(self, session):
        if self.skips and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.skips:
            terminalreporter.section("CI is set: only GPU tests may skip; these skipped", red=True)
            for line in self.skips:
                terminalreporter.line(line)


def pytest_configure(config):
    if os.environ.get("CI") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_SkipsFailCI(), "edgeattn-skips-fail-ci")
