"""``torch``: the PyTorch eager reference.  It rebuilds the registered model named in the file's metadata (name,
config, seed) and runs it, so any exported reference model can be compared with its source."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import Runtime, Session, Tolerance, graph_inputs, io_info, read_onnx


class TorchSession(Session):
    def __init__(self, runtime: str, module: torch.nn.Module, inputs, outputs):
        self.runtime, self.inputs, self.outputs = runtime, inputs, outputs
        self.module = module.eval()

    @classmethod
    def from_file(cls, runtime: str, path: Path) -> "TorchSession":
        from .. import models

        model = read_onnx(path)
        built = models.from_metadata(model, path)
        return cls(runtime, built.module, graph_inputs(model), io_info(model.graph.output))

    def _run(self, feeds):
        with torch.no_grad():
            out = self.module(**{name: torch.from_numpy(array) for name, array in feeds.items()})
        out = torch.utils._pytree.tree_leaves(out)   # the exporter flattens nested outputs the same way
        return {info.name: np.asarray(t.detach().numpy()) for info, t in zip(self.outputs, out)}


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch eager reference (rebuilds the registered model from the file's metadata)"
    # the reference: it runs the fp32 model a file of any precision was exported from
    tolerances = dict.fromkeys(("fp32", "fp16", "bf16", "int8", "int8-static"), Tolerance(atol=0.0, min_cosine=1.0))

    def _load(self, path, accuracy):
        return TorchSession.from_file(self.name, path)
