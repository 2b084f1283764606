import pytest
import torch

from edgeattn import runtimes

CPU_RUNTIMES = ["ort-cpu", "openvino-cpu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require(name: str):
    """Skip (with the runtime's own reason) when a runtime cannot run on this machine."""
    reasons = runtimes.get(name).not_supported_reasons()
    if reasons:
        pytest.skip(f"{name} unavailable: {'; '.join(reasons)}")
