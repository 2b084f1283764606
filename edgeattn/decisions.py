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

:func:`top_k` declares a selection the same way (MoBA's choice of key blocks, :mod:`edgeattn.routing`): export writes
a standard ``TopK``, and a row whose chosen set differs from the runtime's counts as a tie when every entry that
changed sides lies within ``eps`` of the row's boundary (its ``count``-th largest value) on both sides.
"""

from __future__ import annotations

import contextvars
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .attention import ONNX_DTYPES
from .errors import BadFile, InvalidArgument
from .signature import DECISION, DECISION_TOP_K, DOMAIN

# an attribute value torch.onnx.ops.symbolic takes
_Attr = Union[int, float, str, bool, Sequence[int], Sequence[float], Sequence[str], Sequence[bool]]

_LEDGER: contextvars.ContextVar[Optional["Ledger"]] = contextvars.ContextVar("edgeattn_decisions", default=None)


def below(value: torch.Tensor, threshold: float, name: str = "decision") -> torch.Tensor:
    """``value < threshold`` (bool, value's shape), declared as a hard decision named ``name``."""
    if torch.onnx.is_in_onnx_export():
        if value.dtype not in ONNX_DTYPES:
            raise InvalidArgument(f"decision {name}: export compares float tensors, got {value.dtype}")
        attrs: dict[str, _Attr] = {"threshold": float(threshold), "name": name, "dtype": ONNX_DTYPES[value.dtype]}
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{DECISION}", [value], attrs, dtype=torch.bool, shape=tuple(value.shape), version=1
        )
    decided = value < threshold
    ledger = _LEDGER.get()
    return decided if ledger is None else ledger.decide(value, threshold, decided, name)


def top_k(values: torch.Tensor, count: int, name: str = "top_k") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest entries of ``values`` along its last axis, (values, int64 indices) in descending order;
    equal values go to the lower index (ONNX TopK's rule: eager sorts stably to match).  A declared hard decision
    named ``name``."""
    if torch.onnx.is_in_onnx_export():
        if values.dtype not in ONNX_DTYPES:
            raise InvalidArgument(f"decision {name}: export selects among float tensors, got {values.dtype}")
        shape = (*values.shape[:-1], count)
        attrs: dict[str, _Attr] = {"count": int(count), "name": name, "dtype": ONNX_DTYPES[values.dtype]}
        chosen, index = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{DECISION_TOP_K}",
            [values],
            attrs,
            dtypes=[values.dtype, torch.int64],
            shapes=[shape, shape],
            version=1,
        )
        return chosen, index
    chosen, index = _stable_top(values, count)
    ledger = _LEDGER.get()
    return (chosen, index) if ledger is None else ledger.choose(values, count, index, name)


def _stable_top(values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, index = torch.sort(values, dim=-1, descending=True, stable=True)
    return chosen[..., :count], index[..., :count]


class Ledger:
    """The reference re-run with a runtime's decisions at ties.  ``values``: the runtime's compared tensors, one per
    declared decision in the order the model makes them; ``eps``: the largest margin that counts as a tie.

    Use as a context manager around one forward of the reference; then read the counts."""

    def __init__(self, values: Sequence[np.ndarray], eps: float) -> None:
        self.values, self.eps = list(values), float(eps)
        self.calls = self.total = self.ties = self.large = 0
        self.largest_tie = 0.0  # the largest margin of a flip taken from the runtime
        self.largest_flip = 0.0  # the largest margin of a flip kept (not a tie)

    def decide(self, value: torch.Tensor, threshold: float, decided: torch.Tensor, name: str) -> torch.Tensor:
        theirs = self._next(value, name)
        flipped = decided != (theirs < threshold)
        # a tie: both values within eps of the threshold (a runtime far off on the other side is not one)
        margin = torch.maximum((value - threshold).abs(), (theirs - threshold).abs())
        tie = flipped & (margin < self.eps)
        self._count(value.numel(), tie, flipped & ~tie, margin)
        return torch.where(tie, ~decided, decided)

    def choose(
        self, value: torch.Tensor, count: int, index: torch.Tensor, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`top_k` under the ledger: rows whose chosen set differs from the runtime's only among entries
        within ``eps`` of the row's boundary take the runtime's set."""
        theirs = self._next(value, name)
        their_index = _stable_top(theirs, count)[1]
        finite = value > float("-inf")  # entries at -inf (never allowed) are not choices
        ours = torch.zeros_like(value, dtype=torch.bool).scatter(-1, index, True) & finite
        their_set = torch.zeros_like(value, dtype=torch.bool).scatter(-1, their_index, True) & finite
        changed = ours != their_set
        boundary = value.gather(-1, index[..., -1:])
        their_boundary = theirs.gather(-1, their_index[..., -1:])
        distance = torch.maximum((value - boundary).abs(), (theirs - their_boundary).abs())
        margin = torch.where(changed, distance, torch.zeros((), dtype=distance.dtype)).amax(-1)
        flipped = changed.any(-1)
        tie = flipped & (margin < self.eps)
        self._count(value[..., 0].numel(), tie, flipped & ~tie, margin)
        index = torch.where(tie[..., None], their_index, index)
        return value.gather(-1, index), index

    def _next(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """The runtime's tensor for the next declared decision, checked against the model's."""
        if self.calls >= len(self.values):
            raise BadFile(
                f"the model made more decisions than the file declares ({len(self.values)}): the "
                f"file does not come from this model"
            )
        theirs = torch.from_numpy(np.asarray(self.values[self.calls])).to(value.dtype)
        self.calls += 1
        if theirs.shape != value.shape:
            raise BadFile(
                f"decision {name} #{self.calls}: the file's tensor has shape {tuple(theirs.shape)}, "
                f"the model's {tuple(value.shape)}: the file does not come from this model"
            )
        return theirs

    def _count(self, total: int, tie: torch.Tensor, kept: torch.Tensor, margin: torch.Tensor) -> None:
        self.total += total
        self.ties += int(tie.sum())
        self.large += int(kept.sum())
        if tie.any():
            self.largest_tie = max(self.largest_tie, float(margin[tie].max()))
        if kept.any():
            self.largest_flip = max(self.largest_flip, float(margin[kept].max()))

    def __enter__(self) -> "Ledger":
        self._token = _LEDGER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _LEDGER.reset(self._token)
        if exc[0] is None and self.calls != len(self.values):
            raise BadFile(
                f"the model made {self.calls} decisions, the file declares {len(self.values)}: the "
                f"file does not come from this model"
            )

    def summary(self) -> str:
        return (
            f"{self.ties} of {self.total} decisions flipped within {self.eps:g} of their threshold (or top-k "
            f"boundary)" + (f" (largest margin {self.largest_tie:.1e})" if self.ties else "")
        )
