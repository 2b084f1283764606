import pytest
import torch

from edgeattn import runtimes

CPU_RUNTIMES = ["ort-cpu", "openvino-cpu"]
# lowering -> (opset, target runtimes) it is exported and checked with
LOWERING_CASES = {"dense": (18, None), "blocked": (18, None), "attention": (23, None), "contrib": (18, ["ort-cpu"])}
LOWERING_LIST = [(name, *case) for name, case in sorted(LOWERING_CASES.items())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require(name: str):
    """Skip (with the runtime's own reason) when a runtime cannot run on this machine."""
    reasons = runtimes.get(name).not_supported_reasons()
    if reasons:
        pytest.skip(f"{name} unavailable: {'; '.join(reasons)}")


def external_data_file(folder):
    """A plain torch.onnx.export file whose weight lives in model.onnx.data beside it (the exporter's default)."""
    import onnx
    import torch

    model = torch.nn.Linear(512, 256).eval()   # large enough for the exporter to move its weight out
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
