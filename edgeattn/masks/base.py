"""The mask language: a Mask is a named pair of pure functions over attention indices.

``mask_mod(b, h, q_idx, kv_idx) -> bool`` and ``bias_mod(b, h, q_idx, kv_idx) -> float`` use FlexAttention's
signature, so a user's FlexAttention mask_mod works unchanged, and means what it means there: FlexAttention applies
it to one pair at a time (through vmap).  :func:`evaluate` calls a function once on broadcast index tensors
(``q_idx`` shaped (1, 1, Nq, 1), ``kv_idx`` (1, 1, 1, Nkv)), which is fast; a user's function (:func:`custom`) is
also called on a sample of pairs one at a time, and where the broadcast call fails or disagrees with them it is
evaluated as FlexAttention does, through vmap, or refused in one line naming a pair.

Masks on token grids (neighborhood, windows) need the grid to turn flat indices into coordinates, so a Mask holds
a factory ``mods(shape) -> (mask_mod, bias_mod)`` that is called once the :class:`Shape` is known.

A learned relative position bias (NAT's ``rpb``, Swin's ``relative_position_bias_table``) is a weight, not a
constant of the mask: a Mask declares it with ``rpb(shape) -> (table_shape, rpb_index_mod)``, where
``rpb_index_mod(b, h, q_idx, kv_idx)`` returns the int64 row-major position, in a per-head table of
``table_shape``, of the bias the pair (q_idx, kv_idx) gets.  Tables store that index; the layer that owns the
weight gathers ``weight[h, index]`` at run time.  The index only matters where the mask allows the pair.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidArgument

MaskMod = Callable[..., torch.Tensor]
BiasMod = Callable[..., torch.Tensor]
IndexMod = Callable[..., torch.Tensor]
# How many copies of batch element 0 the ``b`` index holds: more than one, so a use of ``b`` shows as an axis.
BATCH_PROBE = 2


@dataclass(frozen=True)
class Shape:
    """What a mask is compiled for: query and key lengths, and the token grid when tokens are laid on one."""

    q_len: int
    kv_len: int
    grid: Optional[tuple[int, ...]] = None

    @classmethod
    def of(cls, q_len=None, kv_len=None, grid=None) -> "Shape":
        if grid is not None:
            grid = tuple(check_int("grid", g, low=1) for g in ((grid,) if isinstance(grid, int) else grid))
            n = math.prod(grid)
            for name, value in (("q_len", q_len), ("kv_len", kv_len)):
                if value is not None and value != n:
                    raise InvalidArgument(
                        f"{name}={value} does not match grid {grid} ({n} tokens); pass one or the other"
                    )
            return cls(n, n, grid)
        if q_len is None:
            raise InvalidArgument("give q_len (and optionally kv_len) or grid")
        q_len = check_int("q_len", q_len, low=1)
        kv_len = q_len if kv_len is None else check_int("kv_len", kv_len, low=1)
        return cls(q_len, kv_len, None)

    def require_grid(self, family: str, ndim: Sequence[int] = (1, 2, 3)) -> tuple[int, ...]:
        if self.grid is None or len(self.grid) not in ndim:
            dims = "/".join(f"{d}-D" for d in ndim)
            raise InvalidArgument(
                f"{family} needs a {dims} token grid, got {self.grid or 'a plain sequence'}; "
                f"pass grid=(...) when building tables or layers"
            )
        return self.grid


@dataclass(frozen=True)
class Mask:
    """A named attention mask.  ``name`` encodes every parameter (``neighborhood_k7_d2``)."""

    name: str
    mods: Callable[[Shape], tuple[MaskMod, Optional[BiasMod]]] = field(repr=False, compare=False)
    # How block tables should tile the queries so a tile's keys form a compact region: per-axis ``tile`` sizes,
    # ``groups`` (interleaved groups, e.g. dilation: a tile stays inside one) and ``offset`` (tiles start at
    # this coordinate, e.g. a window shift).  Each value is an int or a per-axis tuple.  Hints never change
    # which keys are allowed, only how much padding a block table carries.
    tiling: dict = field(default_factory=dict, repr=False, compare=False)
    # Learned relative position bias: shape -> (per-head table shape, rpb_index_mod); None when the mask has none.
    rpb: Optional[Callable[[Shape], tuple[tuple[int, ...], IndexMod]]] = field(default=None, repr=False, compare=False)

    def __and__(self, other: "Mask") -> "Mask":
        return and_masks(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return or_masks(self, other)

    def __rand__(self, other) -> "Mask":  # mask_mod & Mask
        return and_masks(other, self)

    def __ror__(self, other) -> "Mask":
        return or_masks(other, self)


class UserMod:
    """A user's mask_mod or bias_mod: :func:`evaluate` checks it pair by pair (FlexAttention's semantics)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "custom")

    def __call__(self, *index):
        return self.fn(*index)


def custom(mask_mod: Optional[MaskMod] = None, bias_mod: Optional[BiasMod] = None, name: Optional[str] = None) -> Mask:
    """Wrap a user's FlexAttention-style ``mask_mod`` (and/or ``bias_mod``) as a Mask."""
    for label, fn in (("mask_mod", mask_mod), ("bias_mod", bias_mod)):
        if fn is None:
            continue
        if not callable(fn):
            raise InvalidArgument(f"{label} must be a callable (b, h, q_idx, kv_idx), got {fn!r}")
        arity = _arity(fn)
        if arity not in (4, None):
            params = ", ".join(inspect.signature(fn).parameters)
            raise InvalidArgument(
                f"{label} takes {arity} argument{'s' if arity != 1 else ''} ({params}); a FlexAttention {label} "
                f"takes four: (b, h, q_idx, kv_idx), the batch, head, query and key indices"
            )
    if mask_mod is None and bias_mod is None:
        raise InvalidArgument("custom() needs a mask_mod, a bias_mod or both")
    name = name or getattr(mask_mod or bias_mod, "__name__", "custom").replace("<lambda>", "custom")
    user_mask = UserMod(mask_mod) if mask_mod is not None else allow_all
    user_bias = UserMod(bias_mod) if bias_mod is not None else None
    return Mask(name, lambda shape: (user_mask, user_bias))


def as_mask(obj) -> Mask:
    """Accept a Mask or a bare FlexAttention mask_mod."""
    if isinstance(obj, Mask):
        return obj
    if callable(obj):
        return custom(obj)
    raise InvalidArgument(
        f"expected an edgeattn Mask or a mask_mod(b, h, q_idx, kv_idx) callable, got {type(obj).__name__}"
    )


def and_masks(*masks) -> Mask:
    """Allowed where every mask allows; biases add up."""
    return _combine(masks, "&", torch.logical_and)


def or_masks(*masks) -> Mask:
    """Allowed where any mask allows; biases add up."""
    return _combine(masks, "|", torch.logical_or)


def _combine(masks, sep, op) -> Mask:
    if not masks:
        raise InvalidArgument("combining masks needs at least one mask")
    masks = [as_mask(m) for m in masks]
    learned = [m for m in masks if m.rpb is not None]
    # A pair allowed by another mask of an or, or a second table of an and, has no single place in one table.
    if len(learned) > 1 or (learned and sep == "|"):
        raise InvalidArgument(
            f"cannot combine {', '.join(m.name for m in masks)} with "
            f"{'or' if sep == '|' else 'and'}: a relative position bias table only covers its own "
            "mask's pairs; and_masks may hold at most one mask with rpb"
        )

    def mods(shape):
        parts = [m.mods(shape) for m in masks]

        def mask_mod(b, h, q, kv):
            out = parts[0][0](b, h, q, kv)
            for mm, _ in parts[1:]:
                out = op(out, mm(b, h, q, kv))
            return out

        biases = [bm for _, bm in parts if bm is not None]
        bias_mod = (lambda b, h, q, kv: sum(bm(b, h, q, kv) for bm in biases)) if biases else None
        # a combination holding a user's function is checked pair by pair as that function would be
        if any(isinstance(mm, UserMod) for mm, _ in parts):
            mask_mod = UserMod(mask_mod)
        if bias_mod is not None and any(isinstance(bm, UserMod) for bm in biases):
            bias_mod = UserMod(bias_mod)
        return mask_mod, bias_mod

    name = sep.join(f"({m.name})" if ("&" in m.name or "|" in m.name) else m.name for m in masks)
    return Mask(name, mods, next((m.tiling for m in masks if m.tiling), {}), learned[0].rpb if learned else None)


def index_grid(
    shape: Shape, heads: int = 1, q_rows: Optional[slice] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (b, h, q_idx, kv_idx) tensors that mask functions are evaluated on, shaped to broadcast.

    Tables are shared by every batch element, so a mask must not depend on the batch index.  ``b`` holds batch
    element 0 twice, shaped (2, 1, 1, 1): a function that uses it returns two rows on axis 0, which
    :func:`evaluate` refuses, while indexing a per-batch tensor with it stays in range."""
    check_int("heads", heads, low=1)
    rows = range(shape.q_len)[q_rows] if q_rows is not None else range(shape.q_len)
    b = torch.zeros((BATCH_PROBE, 1, 1, 1), dtype=torch.long)
    h = torch.arange(heads).view(1, heads, 1, 1)
    q = torch.arange(rows.start, rows.stop).view(1, 1, -1, 1)
    kv = torch.arange(shape.kv_len).view(1, 1, 1, -1)
    return b, h, q, kv


def evaluate(fn, index, heads: int, label: str = "mask_mod", name: str = "") -> torch.Tensor:
    """A mask_mod (bool) or bias_mod (numbers) on ``index_grid`` tensors -> (heads or 1, Nq, Nkv), as FlexAttention
    would compute it.

    The head axis stays 1 when the function does not depend on the head.  ``name``: the mask's, for errors.  A
    user's function (:class:`UserMod`) is checked on a sample of pairs called one at a time; where the broadcast call
    fails or disagrees, it is evaluated through vmap (as FlexAttention's create_mask does) or refused."""
    if not isinstance(fn, UserMod):
        return _broadcast(fn, index, heads, label, name)
    try:
        out = _broadcast(fn, index, heads, label, name)
        failure = None
    except InvalidArgument as e:
        out, failure = None, e
    try:
        pairs = _pairs(fn, index, heads, label, name)
    except InvalidArgument as e:  # the broadcast call's own failure, when it has one, names the cause best
        raise failure or e from None
    if out is not None and _agrees(out, pairs, label) is None:
        return out
    try:
        mapped = _vmapped(fn, index, heads, label, name)
    except InvalidArgument as e:
        differs = _agrees(out, pairs, label) if out is not None else None
        if differs is not None:
            raise InvalidArgument(
                f"{_what(label, name)} {differs}; through vmap, as FlexAttention runs it, it fails: {e}"
            ) from None
        raise failure or e from None
    differs = _agrees(mapped, pairs, label)
    if differs is not None:
        raise InvalidArgument(f"{_what(label, name)} through vmap {differs}")
    return mapped


def _what(label: str, name: str) -> str:
    return f"{label} of mask {name}" if name else label


def _pairs(fn, index, heads: int, label: str, name: str) -> list[tuple[tuple[int, int, int], tuple, torch.Tensor]]:
    """(where in the output, (h, q_idx, kv_idx), value) for a sample of pairs, each from a call on that pair alone
    (0-d tensors), as FlexAttention calls a mask_mod: the four corners and 24 drawn with a fixed seed."""
    _, h, q, kv = index
    hs, qs, ks = h.flatten(), q.flatten(), kv.flatten()
    picks = {(0, 0, 0), (0, len(qs) - 1, len(ks) - 1), (0, 0, len(ks) - 1), (0, len(qs) - 1, 0)}
    generator = torch.Generator().manual_seed(0)
    for _ in range(24):
        hi, qi, ki = (int(torch.randint(n, (), generator=generator)) for n in (len(hs), len(qs), len(ks)))
        picks.add((hi, qi, ki))
    pairs = []
    for hi, qi, ki in sorted(picks):
        at = (int(hs[hi]), int(qs[qi]), int(ks[ki]))
        try:
            value = fn(*(torch.tensor(v) for v in (0, *at)))
        except Exception as e:
            raise InvalidArgument(
                f"{_what(label, name)} cannot be called on one pair (h={at[0]}, q_idx={at[1]}, kv_idx={at[2]}) as "
                f"FlexAttention calls it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        pair = f"one pair (h={at[0]}, q_idx={at[1]}, kv_idx={at[2]})"
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(
                f"{_what(label, name)} called on {pair} returns a {type(value).__name__}, not a tensor computed "
                f"from its index arguments"
            )
        if value.numel() != 1:
            raise InvalidArgument(
                f"{_what(label, name)} called on {pair} returns shape {tuple(value.shape)}, not one value: it reads "
                f"across pairs, which FlexAttention's one-pair-at-a-time calls do not allow"
            )
        pairs.append(((hi, qi, ki), at, value.reshape(())))
    return pairs


def _agrees(out: torch.Tensor, pairs, label: str) -> Optional[str]:
    """None, or which sampled pair ``out`` (heads or 1, Nq, Nkv) gives otherwise than that pair's own call."""
    for (hi, qi, ki), (h, q, kv), want in pairs:
        got = out[min(hi, out.shape[0] - 1), qi, ki]
        same = bool(got == want) if label == "mask_mod" else bool(torch.isclose(got.float(), want.float(), 1e-5, 1e-6))
        if not same:
            return (
                f"gives {got.item()} for the pair (q_idx={q}, kv_idx={kv}, head {h}) on broadcast index tensors "
                f"but {want.item()} called on that pair alone, as FlexAttention calls it: it reads across pairs "
                f"(a reduction, a Python if, indexing a whole axis); write it for one pair"
            )
    return None


def _vmapped(fn, index, heads: int, label: str, name: str) -> torch.Tensor:
    """The function over every (head, query, key) through nested vmap, FlexAttention's way -> (heads, Nq, Nkv)."""
    b, h, q, kv = index
    mapped = fn
    for axis in (3, 2, 1):  # keys innermost, as create_mask nests them
        mapped = torch.vmap(mapped, in_dims=tuple(0 if i == axis else None for i in range(4)))
    try:
        out = mapped(b, h.flatten(), q.flatten(), kv.flatten())
    except Exception as e:  # vmap's own messages go on to ask for an issue: their first sentence says it
        raise InvalidArgument(
            f"{type(e).__name__}: {str(e).split('. ')[0].splitlines()[0] if str(e) else ''}"
        ) from None
    if out.shape != (h.numel(), q.numel(), kv.numel()):  # extra axes: it used b, whose probe holds 2 rows
        raise InvalidArgument(
            f"{_what(label, name)} depends on the batch index b: a static table is shared by every batch element"
        )
    return _broadcast(lambda *_: out[None], index, heads, label, name)


def _broadcast(fn, index, heads: int, label: str, name: str) -> torch.Tensor:
    """``fn`` called once on the broadcast index tensors, checked -> (heads or 1, Nq, Nkv)."""
    b, h, q, kv = index
    what = _what(label, name)
    try:
        out = fn(b, h, q, kv)
    except IndexError as e:
        raise InvalidArgument(
            f"{what} indexes out of range ({str(e).splitlines()[0]}): the tensors it captures must "
            f"cover every query and key index of the shape the table is built for"
        ) from e
    except (RuntimeError, TypeError) as e:
        raise InvalidArgument(
            f"{what} cannot be evaluated on index tensors ({type(e).__name__}: {str(e).splitlines()[0]}). It is "
            f"called with tensors of indices (once on all of them: b {tuple(b.shape)}, h {tuple(h.shape)}, q_idx "
            f"{tuple(q.shape)}, kv_idx {tuple(kv.shape)}; or through vmap, as FlexAttention does), not on Python "
            f"numbers: write conditions with &, |, ~ and torch.where instead of Python if/and/or, and do not call "
            f".item(), int() or bool() on them"
        ) from e
    if not isinstance(out, torch.Tensor):
        raise InvalidArgument(
            f"{what} must return a tensor computed from its index arguments, got {type(out).__name__}"
        )
    if label == "mask_mod" and out.dtype != torch.bool:
        raise InvalidArgument(f"{what} must return a bool tensor (True = may attend), got {out.dtype}")
    if label == "bias_mod" and (out.dtype == torch.bool or out.is_complex()):
        raise InvalidArgument(f"{what} must return a real-valued tensor, got {out.dtype}")
    if label == "rpb_index_mod" and (out.dtype == torch.bool or out.is_floating_point() or out.is_complex()):
        raise InvalidArgument(f"{what} must return an integer tensor (positions in the bias table), got {out.dtype}")
    if out.ndim >= 4 and out.shape[-4] != 1:
        raise InvalidArgument(
            f"{what} depends on the batch index b: a static table is shared by every batch element, so it cannot "
            f"give each element its own mask (such as document masking with per-sequence ids). Compute that mask "
            f"in the model from its inputs and call edgeattn.masked_attention(q, k, v, mask) with it (export keeps "
            f"it as a graph computation), or write the mask from h, q_idx and kv_idx only"
        )
    full = (heads if out.ndim >= 3 and out.shape[-3] != 1 else 1, q.shape[2], kv.shape[3])
    try:
        return out.broadcast_to((1,) + full)[0]
    except RuntimeError:
        raise InvalidArgument(
            f"{what} must broadcast over (b, h, q_idx, kv_idx) index tensors to {full}; "
            f"it returned shape {tuple(out.shape)}"
        ) from None


def materialize(mask, q_len=None, kv_len=None, grid=None, heads: int = 1) -> torch.Tensor:
    """The full boolean mask, shaped (heads, Nq, Nkv): True where a query may attend a key."""
    shape = Shape.of(q_len, kv_len, grid)
    mask = as_mask(mask)
    mask_mod, _ = mask.mods(shape)
    return evaluate(mask_mod, index_grid(shape, heads), heads, name=mask.name).expand(heads, -1, -1).clone()


def rpb_index(mask, q_len=None, kv_len=None, grid=None) -> torch.Tensor:
    """The (Nq, Nkv) int64 position of each allowed pair's bias in the mask's per-head rpb table; -1 where masked."""
    shape = Shape.of(q_len, kv_len, grid)
    mask = as_mask(mask)
    if mask.rpb is None:
        raise InvalidArgument(f"mask {mask.name} has no relative position bias; build it with rpb=True")
    mask_mod, _ = mask.mods(shape)
    _, index_mod = mask.rpb(shape)
    index = index_grid(shape)
    allowed = evaluate(mask_mod, index, 1, name=mask.name)[0]
    return torch.where(allowed, evaluate(index_mod, index, 1, "rpb_index_mod", mask.name)[0].long(), -1)


def _arity(fn):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


# ----------------------------------------------------------------------------- argument checks
# Shared by the mask families and by the models built on them.
def check_int(name: str, value, low: int = 0, high: Optional[int] = None) -> int:
    """Validate an integer parameter; the error names the parameter and the allowed range."""
    integer_tensor = isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point()
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or integer_tensor):
        raise InvalidArgument(f"{name} must be an integer in {_range(low, high)}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise InvalidArgument(f"{name} must be in {_range(low, high)}, got {value}")
    return value


def _range(low, high):
    return f"[{low}, {high}]" if high is not None else f"[{low}, inf)"


def per_axis(name: str, value, ndim: int, low: int = 0) -> tuple[int, ...]:
    """Expand an int or per-axis tuple to ``ndim`` validated ints."""
    values = (value,) * ndim if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != ndim:
        raise InvalidArgument(f"{name} has {len(values)} entries for a {ndim}-D grid; give one int or {ndim} ints")
    return tuple(check_int(name, v, low=low) for v in values)


# ----------------------------------------------------------------------------- pieces of mask functions
def allow_all(b, h, q_idx, kv_idx) -> torch.Tensor:
    """The mask_mod that allows every pair (masks that only add a bias, a bias_mod without a mask_mod)."""
    return torch.ones((), dtype=torch.bool).expand(torch.broadcast_shapes(q_idx.shape, kv_idx.shape))


def fmt_axes(values) -> str:
    """Per-axis values for a mask name: ``7`` when all axes agree, else ``3x5``."""
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def axis_coords(idx: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major flat index -> one coordinate tensor per axis."""
    coords = []
    for size in reversed(grid):
        coords.append(idx % size)
        idx = idx // size
    return coords[::-1]
