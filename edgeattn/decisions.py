"""Hard decisions: comparisons whose outcome changes what a model computes, such as Mask2Former's attention mask
``sigmoid(logits) < 0.5``.

Outputs are not continuous in such a comparison.  A value within float rounding of its threshold can land on the
other side on another runtime (+2.5e-7 in PyTorch, -3.1e-7 on onnxruntime); that query then attends other keys and
the difference cascades through later layers to far more than rounding.  So a model declares each such comparison
with :func:`below`:

- in eager PyTorch it is ``value < threshold``;
- export writes it as a standard ``Less`` and records the compared tensor's name in the file's ``decisions``
  metadata, so the parity check can read that tensor back from a runtime;
- inside a :class:`Ledger` (what parity uses) the reference takes the runtime's decision wherever the two disagree
  while both values lie within ``eps`` of the threshold (a tie), counts those flips, and counts flips at larger
  margins, which stay the reference's and fail the check.
"""
from __future__ import annotations

import contextvars
from typing import Optional, Sequence

import numpy as np
import torch

from .attention import ONNX_DTYPES
from .errors import EdgeAttnError
from .onnxfile import DECISION, DOMAIN

_LEDGER: contextvars.ContextVar[Optional["Ledger"]] = contextvars.ContextVar("edgeattn_decisions", default=None)


def below(value: torch.Tensor, threshold: float, name: str = "decision") -> torch.Tensor:
    """``value < threshold`` (bool, value's shape), declared as a hard decision named ``name``."""
    if torch.onnx.is_in_onnx_export():
        if value.dtype not in ONNX_DTYPES:
            raise ValueError(f"decision {name}: export compares float tensors, got {value.dtype}")
        attrs = {"threshold": float(threshold), "name": name, "dtype": ONNX_DTYPES[value.dtype]}
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{DECISION}", [value], attrs, dtype=torch.bool,
                                       shape=tuple(value.shape), version=1)
    decided = value < threshold
    ledger = _LEDGER.get()
    return decided if ledger is None else ledger.decide(value, threshold, decided, name)


class Ledger:
    """The reference re-run with a runtime's decisions at ties.  ``values``: the runtime's compared tensors, one per
    declared decision in the order the model makes them; ``eps``: the largest margin that counts as a tie.

    Use as a context manager around one forward of the reference; then read the counts."""

    def __init__(self, values: Sequence[np.ndarray], eps: float):
        self.values, self.eps = list(values), float(eps)
        self.calls = self.total = self.ties = self.large = 0
        self.largest_tie = 0.0     # the largest margin of a flip taken from the runtime
        self.largest_flip = 0.0    # the largest margin of a flip kept (not a tie)

    def decide(self, value: torch.Tensor, threshold: float, decided: torch.Tensor, name: str) -> torch.Tensor:
        if self.calls >= len(self.values):
            raise EdgeAttnError(f"the model made more decisions than the file declares ({len(self.values)}): the "
                                f"file does not come from this model")
        theirs = torch.from_numpy(np.asarray(self.values[self.calls])).to(value.dtype)
        self.calls += 1
        if theirs.shape != value.shape:
            raise EdgeAttnError(f"decision {name} #{self.calls}: the file's tensor has shape {tuple(theirs.shape)}, "
                                f"the model's {tuple(value.shape)}: the file does not come from this model")
        flipped = decided != (theirs < threshold)
        # a tie: both values within eps of the threshold (a runtime far off on the other side is not one)
        margin = torch.maximum((value - threshold).abs(), (theirs - threshold).abs())
        tie = flipped & (margin < self.eps)
        kept = flipped & ~tie
        self.total += value.numel()
        self.ties += int(tie.sum())
        self.large += int(kept.sum())
        if tie.any():
            self.largest_tie = max(self.largest_tie, float(margin[tie].max()))
        if kept.any():
            self.largest_flip = max(self.largest_flip, float(margin[kept].max()))
        return torch.where(tie, ~decided, decided)

    def __enter__(self) -> "Ledger":
        self._token = _LEDGER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _LEDGER.reset(self._token)
        if exc[0] is None and self.calls != len(self.values):
            raise EdgeAttnError(f"the model made {self.calls} decisions, the file declares {len(self.values)}: the "
                                f"file does not come from this model")

    def summary(self) -> str:
        return (f"{self.ties} of {self.total} decisions flipped at |value - threshold| < {self.eps:g}"
                + (f" (largest margin {self.largest_tie:.1e})" if self.ties else ""))
