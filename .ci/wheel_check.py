"""Run by .ci/run with the venv the wheel was installed into, outside the repository: the installed package (not
the checkout) imports in full, carries its package data, and exports and runs a small model."""

import importlib
import pkgutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import edgeattn

installed = Path(edgeattn.__file__).parent
assert Path(sys.prefix) in installed.parents, f"edgeattn imported from {installed}, not from the wheel's venv"
assert (installed / "py.typed").is_file(), "py.typed is missing from the wheel"
names = [m.name for m in pkgutil.walk_packages(edgeattn.__path__, "edgeattn.") if m.name != "edgeattn.__main__"]
for name in names:
    importlib.import_module(name)

layer = edgeattn.MaskedSelfAttention(16, 2, edgeattn.masks.neighborhood(3), grid=(4, 4)).eval()
x = torch.randn(1, 16, 16)
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "layer.onnx"
    edgeattn.export_onnx(layer, (x,), path, input_names=["x"], output_names=["y"])
    got = edgeattn.load(path, "ort-cpu").run({"x": x.numpy()})["y"]
with torch.no_grad():
    assert np.abs(got - layer(x).numpy()).max() < 1e-4
print(f"wheel ok: {len(names)} modules from {installed}")
