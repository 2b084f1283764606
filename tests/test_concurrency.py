"""One Session shared by 8 threads and 4 Sessions side by side (1,000 runs a round; one warm-up round, then 3
measured), each run bit for bit the sequential result, and resident memory that does not grow with the run count."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeattn
from edgeattn import export_onnx, masks
from edgeattn.layers import MaskedSelfAttention

from conftest import CPU_RUNTIMES, require

# threads, signals and servers: these run one after another on one xdist worker (docs/getting-started.md)
pytestmark = pytest.mark.xdist_group("serial")

THREADS, RUNS_PER_THREAD, SESSIONS, RUNS_PER_SESSION = 8, 100, 4, 50  # 8 x 100 + 4 x 50 = 1,000 runs


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status to read resident memory from")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    path = tmp_path_factory.mktemp("conc") / "m.onnx"
    export_onnx(layer, [torch.randn(1, 36, 16)], path, input_names=["x"], output_names=["y"])
    return path


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_threads_and_sessions_give_sequential_results(model_file, name):
    require(name)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 36, 16), dtype=np.float32) for _ in range(16)]
    first = edgeattn.load(model_file, name)
    expected = [first.run({"x": x})["y"] for x in inputs]
    sessions = [first] + [edgeattn.load(model_file, name) for _ in range(SESSIONS - 1)]
    mismatches, errors = [], []

    def work(session, runs, offset):
        try:
            for i in range(runs):
                k = (i + offset) % len(inputs)
                if not np.array_equal(session.run({"x": inputs[k]})["y"], expected[k]):
                    mismatches.append(k)
        except Exception as e:  # a thread's exception would otherwise vanish
            errors.append(e)

    def round_():
        threads = [threading.Thread(target=work, args=(first, RUNS_PER_THREAD, t)) for t in range(THREADS)]
        threads += [threading.Thread(target=work, args=(s, RUNS_PER_SESSION, 3 * i)) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    round_()  # warm: thread pools, per-thread infer requests, allocator arenas
    before = rss_mb()
    for _ in range(3):
        round_()  # 3,000 more runs
    growth = rss_mb() - before
    print(f"{name}: 4,000 runs from {THREADS} threads + {SESSIONS} sessions, RSS {before:.0f} MB, +{growth:.1f} MB")
    assert not errors and not mismatches, (errors[:1], len(mismatches))
    assert growth < 25, f"resident memory grew {growth:.1f} MB over 3,000 runs"
