"""FlexAttention calls -> edgeattn tables.

A module that calls ``torch.nn.attention.flex_attention.flex_attention(q, k, v, score_mod=..., block_mask=...)``
cannot be exported (torch.onnx has no rule for it).  :func:`convert` runs the module once on its example inputs and
gives each flex_attention call, in call order, a :class:`FlexSite`: a ``MaskTable`` compiled from the call's mask
for its shape, plus what its ``score_mod`` does.  From then on, while the module runs (hooks on it), its
flex_attention calls go to their sites, which call edgeattn's op: eager, training and export all see edgeattn.

Exact semantics of a call (FlexAttention's):
- a (query, key) pair is attended iff its block is a full block of the ``block_mask``, or a partial block and
  ``mask_mod`` allows it (for a ``create_block_mask(mask_mod, ...)`` mask this is ``mask_mod`` itself); without a
  block_mask every pair is;
- ``score_mod(score, b, h, q_idx, kv_idx)`` sees the scaled score; it may add a bias that is a function of the
  indices (ALiBi, a relative bias read from a captured tensor or Parameter) and/or soft-cap the score
  (``c * tanh(score / c)``, before the bias).  A bias that depends on a trainable Parameter is recomputed from the
  score_mod on every call, so it stays a weight; other biases are compiled into the table.  Any other score_mod is
  refused with one error;
- ``scale`` defaults to 1/sqrt(head dim); ``enable_gqa`` repeats each key/value head for its group of query heads;
- a query with no allowed key returns zeros.
Masks may not depend on the batch index (one table serves every batch element).
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch import nn

from ..attention import attend
from ..errors import InvalidArgument
from ..layers import MaskTable
from ..masks.base import Shape, custom, evaluate, index_grid
from ..signature import TABLE_INPUTS
from .flex_routing import ROUTER, closure_cells, mentions_flex

# rows of the score grid a score_mod is probed on (first and last rows: enough to tell its form apart)
PROBE_ROWS = 32


def convert(module: nn.Module, example_inputs, layout: str) -> list[str]:
    """Give every flex_attention call ``module`` makes on ``example_inputs`` an edgeattn site (see the module doc)."""
    if (
        "torch.nn.attention.flex_attention" not in sys.modules
        or isinstance(getattr(module, SITES, None), FlexCalls)
        or not example_inputs
    ):
        return []  # nothing can call flex_attention before its module is imported; calls are found by running
    calls = FlexCalls(layout)
    calls.attach(module)
    try:
        with torch.no_grad():
            module(*example_inputs)
    except BaseException:
        calls.detach(module)
        raise
    if not calls.sites:
        calls.detach(module)
        return []
    return [f"flex_attention call {i}: {site.describe()}" for i, site in enumerate(calls.sites)]


SITES = "edgeattn_flex"  # the attribute of a converted module holding its FlexCalls


@contextlib.contextmanager
def converted_for_export(module: nn.Module, example_inputs):
    """:func:`edgeattn.export_onnx` on a module that calls flex_attention directly: converted for the time of the
    export (layout auto), and left as it was afterwards.  Only a module whose own methods name flex_attention is
    run for this (an extra forward, which a module with state would feel), so other exports are unchanged."""
    lines = convert(module, example_inputs, "auto") if mentions_flex(module) else []
    try:
        yield lines
    finally:
        if lines:
            getattr(module, SITES).detach(module)


class FlexSite(nn.Module):
    """One flex_attention call site: its table, and what its score_mod does."""

    def __init__(self, q, k, v, score_mod, block_mask, scale, enable_gqa: bool, layout: str):
        super().__init__()
        _, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        if enable_gqa and heads % kv_heads:
            raise InvalidArgument(
                f"flex_attention with enable_gqa needs query heads ({heads}) to be a multiple of "
                f"key/value heads ({kv_heads})"
            )
        self.group = heads // kv_heads if enable_gqa else 1
        self.scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
        self.signature = _signature(q, k, v, score_mod, block_mask, scale, enable_gqa)
        shape = Shape.of(q_len, kv_len)
        mask_mod, name = _mask_mod(block_mask, q_len, kv_len)
        self.softcap, bias, self.trainable_bias = _score_parts(score_mod, heads, shape, name)
        self.score_mod = score_mod if self.trainable_bias else None
        mask = custom(mask_mod, None if self.trainable_bias else bias, name=name)
        # a trainable bias is recomputed per call in the table's own layout (_with_bias): one node, not buckets
        self.table = MaskTable(mask, heads, q_len=q_len, kv_len=kv_len, layout=layout, buckets=not self.trainable_bias)

    def describe(self) -> str:
        extras = [f"softcap {self.softcap:g}"] if self.softcap else []
        extras += ["trainable bias"] * self.trainable_bias
        extras += [f"gqa x{self.group}"] * (self.group > 1)
        return (
            f"-> edgeattn {self.table.mask.name} ({self.table.shape.q_len}x{self.table.shape.kv_len}, "
            f"{self.table.layout}{''.join(', ' + e for e in extras)})"
        )

    def forward(self, q, k, v):
        if self.group > 1:
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        table = self.table
        tensors = [getattr(table, f"attn_{name}") for name in TABLE_INPUTS[table.layout]]
        if self.trainable_bias:
            tensors = self._with_bias(tensors, q.shape[1])
        return attend(q, k, v, table.layout, tensors, self.scale, table.mask.name, softcap=self.softcap)

    def _with_bias(self, tensors: list, heads: int) -> list:
        """The score_mod's bias computed from its weights on this call, in the table's layout.  A block table's
        bank is shared by tiles at different positions, so each tile gets its own bank entry here."""
        zero_b = torch.zeros((), dtype=torch.long)
        h = torch.arange(heads).view(1, heads, 1, 1)
        if self.table.layout == "dense":
            q = torch.arange(self.table.shape.q_len).view(1, 1, -1, 1)
            kv = torch.arange(self.table.shape.kv_len).view(1, 1, 1, -1)
            tensors[-1] = self._bias(zero_b, h, q, kv)[0]  # (heads or 1, Nq, Nkv)
            return tensors
        q_index, kv_index, q_pos, bank, block, _ = tensors
        tiles = q_index.shape[0]
        bias = self._bias(zero_b, h, q_index.view(tiles, 1, -1, 1), kv_index.view(tiles, 1, 1, -1))
        return [q_index, kv_index, q_pos, bank[block], torch.arange(tiles), bias]

    def _bias(self, b, h, q, kv):
        out = self.score_mod(torch.zeros((), dtype=torch.float32), b, h, q, kv)
        return out.float().expand(torch.broadcast_shapes(out.shape, h.shape, q.shape, kv.shape))


class FlexCalls(nn.Module):
    """The flex_attention sites of a converted module, in call order; routes its calls to them while it runs."""

    def __init__(self, layout: str):
        super().__init__()
        self.sites = nn.ModuleList()
        self.layout = layout
        self.next = 0
        self.recording = True
        self.code_modules: list[str] = []
        self.code_cells: list = []

    def forward(self, *args):
        """Passes its input through: a converted ``nn.Sequential`` calls every child, this one included."""
        return args[0] if len(args) == 1 else args

    def attach(self, module: nn.Module) -> None:
        # where the model's code lives: names bound to flex_attention there are looked up on every forward
        self.code_modules = sorted({type(m).__module__ for m in module.modules()})
        self.code_cells = closure_cells({type(m) for m in module.modules()})
        module.add_module(SITES, self)
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit, always_call=True)

    def detach(self, module: nn.Module) -> None:
        # by identity rather than by handle: a deep copy of the module holds copies of these hooks
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)
        delattr(module, SITES)

    def _enter(self, module, args):
        self.next = 0
        ROUTER.push(self)

    def _exit(self, module, args, output):
        ROUTER.pop(self)
        if self.recording:
            self.recording = False
        elif self.next != len(self.sites):
            raise InvalidArgument(
                f"{type(module).__name__} made {self.next} flex_attention calls, but it made "
                f"{len(self.sites)} when it was converted: a converted module must run the same "
                f"calls on every forward (convert it again for other inputs)"
            )

    def call(
        self,
        query,
        key,
        value,
        score_mod=None,
        block_mask=None,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        kernel_options=None,
        *,
        return_aux=None,
    ):
        if return_lse or return_aux is not None:
            raise InvalidArgument(
                "a converted flex_attention returns the attention output only: return_lse and "
                "return_aux (log-sum-exp, max scores) are not supported (NATTEN's modules ask for "
                "them: convert a NATTEN model with edgeattn.convert(model, *inputs) before export)"
            )
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise InvalidArgument(f"flex_attention takes 4-D (B, H, N, D) query/key/value, got {query.dim()}-D")
        if self.recording:
            self.sites.append(FlexSite(query, key, value, score_mod, block_mask, scale, enable_gqa, self.layout))
        elif self.next >= len(self.sites):
            raise InvalidArgument(
                f"this forward made more flex_attention calls than the {len(self.sites)} it made "
                f"when it was converted; convert it again for these inputs"
            )
        site = self.sites[self.next]
        self.next += 1
        got = _signature(query, key, value, score_mod, block_mask, scale, enable_gqa)
        if got != site.signature:
            raise InvalidArgument(
                f"flex_attention call {self.next - 1} differs from the one converted "
                f"({_difference(site.signature, got)}): its table was compiled for that call; "
                f"convert the module again for these inputs"
            )
        return site(query, key, value)


def _signature(q, k, v, score_mod, block_mask, scale, enable_gqa) -> tuple:
    """What a site's table and score analysis depend on (the batch size does not count)."""
    mask_mod = getattr(block_mask, "mask_mod", None)
    block = None if block_mask is None else (tuple(block_mask.shape[1:]), tuple(block_mask.BLOCK_SIZE))
    return (
        tuple(q.shape[1:]),
        tuple(k.shape[1:]),
        tuple(v.shape[1:]),
        _code(score_mod),
        _code(mask_mod),
        block,
        scale,
        bool(enable_gqa),
    )


def _code(fn):
    return getattr(fn, "__code__", None) or (type(fn) if fn is not None else None)


def _difference(want: tuple, got: tuple) -> str:
    labels = [
        "query shape",
        "key shape",
        "value shape",
        "score_mod",
        "mask_mod",
        "block mask shape",
        "scale",
        "enable_gqa",
    ]
    return "; ".join(f"{label} {w} -> {g}" for label, w, g in zip(labels, want, got) if w != g)


def _mask_mod(block_mask, q_len: int, kv_len: int):
    """The element mask a flex_attention call applies, as a mask_mod, and its name."""
    from torch.nn.attention.flex_attention import _LARGE_SPARSE_BLOCK_SIZE, _ordered_to_dense, noop_mask

    if block_mask is None or tuple(block_mask.BLOCK_SIZE) == (_LARGE_SPARSE_BLOCK_SIZE,) * 2:
        return noop_mask, "full"
    user = block_mask.mask_mod
    name = getattr(user, "__name__", "flex_mask").replace("<lambda>", "flex_mask")
    if tuple(block_mask.seq_lengths) != (q_len, kv_len):
        raise InvalidArgument(
            f"block_mask was created for {tuple(block_mask.seq_lengths)} (q_len, kv_len) but the "
            f"call has ({q_len}, {kv_len}); create it for the call's lengths"
        )
    bq, bk = block_mask.BLOCK_SIZE
    n_kb = -(-kv_len // bk)
    partial = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, n_kb).bool()
    full = (
        torch.zeros_like(partial)
        if block_mask.full_kv_num_blocks is None
        else _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kb).bool()
    )
    if partial.shape[0] > 1 and not ((partial == partial[:1]).all() and (full == full[:1]).all()):
        raise InvalidArgument(
            f"block_mask of {name} differs between batch elements: a static table serves every "
            f"batch element; compute such a mask in the model and call edgeattn.masked_attention"
        )
    partial, full = partial[0], full[0]  # (H or 1, nq blocks, nkv blocks)
    block_heads = partial.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        hb = h if block_heads > 1 else torch.zeros_like(h)
        qb, kb = q_idx // bq, kv_idx // bk
        return full[hb, qb, kb] | (partial[hb, qb, kb] & user(b, h, q_idx, kv_idx))

    return mask_mod, name


def _score_parts(score_mod, heads: int, shape: Shape, name: str):
    """What ``score_mod`` does, from probing it: (softcap or None, bias_mod or None, bias is trainable)."""
    from torch.nn.attention.flex_attention import _identity

    if score_mod is None or score_mod is _identity:
        return None, None, False
    what = f"score_mod of the flex_attention call with mask {name}"
    rows = sorted(set(range(min(PROBE_ROWS, shape.q_len))) | set(range(max(shape.q_len - PROBE_ROWS, 0), shape.q_len)))
    b, h, _, kv = index_grid(shape, heads)
    q = torch.tensor(rows).view(1, 1, -1, 1)

    def call(score):
        return evaluate(lambda *idx: score_mod(score, *idx).float(), (b, h, q, kv), heads, "score_mod", name)

    with torch.enable_grad():
        base = call(torch.zeros(()))
    trainable = base.requires_grad
    base = base.detach()
    generator = torch.Generator().manual_seed(0)
    score = torch.randn((1, 1, len(rows), shape.kv_len), generator=generator) * 4
    with torch.no_grad():
        change = call(score) - base
        softcap = None
        # float rounding of score + bias is relative to the larger of the two
        slack = 1e-5 * (1 + base.abs() + score[0].abs())
        if not ((change - score[0]).abs() <= slack).all():
            cap = float((call(torch.full((), 1e6)) - base).mean())
            softcap = cap if cap > 0 and math.isfinite(cap) else None
            capped = None if softcap is None else softcap * torch.tanh(score[0] / softcap)
            if capped is None or not ((change - capped).abs() <= slack).all():
                raise InvalidArgument(
                    f"{what} changes the score in a way edgeattn cannot carry: it supports adding a function of "
                    f"(b, h, q_idx, kv_idx) (ALiBi, relative biases) and tanh soft-capping (c * tanh(score / c)) "
                    f"before such a bias; write other score changes as a bias or a mask"
                )
    if not trainable and not base.any():
        return softcap, None, False

    def bias_mod(b, h, q_idx, kv_idx):
        return score_mod(torch.zeros(()), b, h, q_idx, kv_idx).float()

    return softcap, bias_mod, trainable
