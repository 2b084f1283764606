"""``torch``: the PyTorch eager reference, one more runtime.  It runs the torch module a file came from: the one
given to :meth:`Runtime.load` (``compare_model``), or the registered model named in the file's metadata (name,
config, seed), rebuilt, so any exported reference model can be compared with its source."""
from __future__ import annotations

import numpy as np
import torch

from ..onnxfile import formats
from ..errors import EdgeAttnError
from .base import Runtime, Session, Tolerance


class TorchSession(Session):
    """Runs a torch module in eval mode without gradients on numpy feeds; its outputs are the reference."""

    def __init__(self, runtime: str, module: torch.nn.Module, inputs, outputs):
        self.runtime, self.inputs, self.outputs = runtime, inputs, outputs
        self.module = module

    def _run(self, feeds):
        was_training = self.module.training
        try:
            with torch.no_grad():
                out = self.module.eval()(*(torch.from_numpy(feeds[i.name]) for i in self.inputs))
        finally:
            self.module.train(was_training)
        out = torch.utils._pytree.tree_leaves(out)   # the exporter flattens nested outputs the same way
        if len(out) != len(self.outputs):
            raise EdgeAttnError(f"the file has {len(self.outputs)} outputs, the model returns {len(out)} tensors")
        return {info.name: np.asarray(t.detach().cpu().numpy()) for info, t in zip(self.outputs, out)}


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch eager reference (rebuilds the registered model from the file's metadata)"
    # the reference: it runs the fp32 model a file of any precision was exported from
    tolerances = dict.fromkeys(("fp32", "fp16", "bf16", "int8", "int8-static"), Tolerance(atol=0.0, min_cosine=1.0))
    reference = True
    file_formats = frozenset(formats.FORMATS)

    def _load(self, path, accuracy, module, observe=()):
        file = formats.header(path)
        if module is None:
            from .. import models

            module = models.from_metadata(file.metadata, path).module
        return TorchSession(self.name, module, file.inputs, file.outputs)
