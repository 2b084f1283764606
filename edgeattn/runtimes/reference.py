"""``torch``: the PyTorch eager reference, one more runtime.  It runs the torch module a file came from, given to
:meth:`Runtime.load`: parity's ``compare_model`` passes the user's module, ``edgeattn check`` and ``bench`` the
registered model they rebuild from the file's metadata (:func:`edgeattn.models.from_metadata`), above this floor."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeAttnError, InvalidArgument
from ..onnxfile import formats
from .base import Runtime, Session, Tolerance


class TorchSession(Session):
    """Runs a torch module in eval mode without gradients on numpy feeds; its outputs are the reference."""

    def __init__(self, runtime: str, module: torch.nn.Module, inputs, outputs) -> None:
        self.runtime, self.inputs, self.outputs = runtime, inputs, outputs
        self.module = module

    def _run(self, feeds):
        was_training = self.module.training
        try:
            with torch.no_grad():
                out = self.module.eval()(*(torch.from_numpy(feeds[i.name]) for i in self.inputs))
        finally:
            self.module.train(was_training)
        out = torch.utils._pytree.tree_leaves(out)  # the exporter flattens nested outputs the same way
        if len(out) != len(self.outputs):
            raise EdgeAttnError(f"the file has {len(self.outputs)} outputs, the model returns {len(out)} tensors")
        return {info.name: np.asarray(t.detach().cpu().numpy()) for info, t in zip(self.outputs, out)}


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch eager reference (runs the module the file came from)"
    # the reference: it runs the fp32 model a file of any precision was exported from
    tolerances = dict.fromkeys(("fp32", "fp16", "bf16", "int8", "int8-static"), Tolerance(atol=0.0, min_cosine=1.0))
    reference = True
    file_formats = frozenset(formats.FORMATS)

    def _load(self, path, accuracy, module, observe=()):
        file = formats.header(path)
        if module is None:
            raise InvalidArgument(
                f"{path}: the torch runtime runs the PyTorch module the file came from, which the "
                f"file does not hold: pass it (load(path, 'torch', module=...)), or run `edgeattn "
                f"check`, which rebuilds a registered model from the file's metadata"
            )
        return TorchSession(self.name, module, file.inputs, file.outputs)
