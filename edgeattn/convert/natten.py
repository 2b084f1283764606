"""NATTEN's neighborhood-attention modules -> edgeattn layers with the same weights and semantics.

Reference: NATTEN (github.com/SHI-Labs/NATTEN): ``src/natten/modules.py`` (0.18 on; 0.21 is what installs next
to today's torch) and ``src/natten/na1d.py`` .. ``na3d.py`` / ``natten1d.py`` .. ``natten3d.py`` (0.14 to 0.17,
the API of SHI-Labs' NAT / DiNAT checkpoints).

Both APIs are recognised by class name (``NeighborhoodAttention1D/2D/3D`` anywhere in the class hierarchy, with
that class's own forward) and attributes, without importing natten: the old versions do not install next to
today's torch, and a module is what it holds, not where it came from.

- natten >= 0.18: ``kernel_size``, ``stride``, ``dilation``, ``is_causal`` (tuples), ``num_heads``, ``scale``,
  ``qkv`` and ``proj`` Linears, ``proj_drop``.  Attention is ``softmax(scale * q k^T)`` over the neighborhood.
- natten 0.14-0.17: the same without ``stride`` and with ``rpb``, a Parameter (heads, 2k-1, ...) or None, added to
  the scaled scores (``q * scale`` then ``q k^T + rpb``); ``kernel_size`` and ``dilation`` are ints or tuples (the
  0.14 3-D module keeps the depth's as ``kernel_size_d`` / ``dilation_d``); ``is_causal`` from 0.15 on;
  ``attn_drop`` on the attention weights.

Every module is replaced in its parent by :class:`NeighborhoodAttention` (a module given to :func:`edgeattn.convert`
that is itself a NATTEN module gets a parent there, see :func:`is_layer`), which takes over the original's ``qkv``,
``proj`` and ``rpb`` as they are, so state-dict keys and values are unchanged.  Its grid is the one the module saw
when the model ran once on the example inputs (a forward pre-hook records it): tables are static.

Dropout: ``proj_drop`` is kept (a Dropout after ``proj``, exactly as before).  edgeattn's attention has no dropout
on its weights, so a module with ``attn_drop.p > 0`` converts only in eval mode, and the converted layer refuses to
run in training mode rather than train without it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import tables
from ..errors import ExportFailed, InvalidArgument, first_line
from ..layers import MaskTable, check_heads, split_qkv
from ..masks import neighborhood

CLASS_NAMES = {f"NeighborhoodAttention{n}D": n for n in (1, 2, 3)}
LEGACY = "0.14-0.17 API"


class NeighborhoodAttention(nn.Module):
    """A NATTEN ``NeighborhoodAttention{1,2,3}D`` on an edgeattn mask table: (B, *grid, C) -> (B, *grid, C).

    ``qkv`` (C -> 3C, packed as (3, heads, head_dim)) and ``proj`` are the original's Linears and ``rpb`` its
    relative position bias Parameter (or None); ``scale`` multiplies q k^T before ``rpb`` is added."""

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        heads: int,
        grid: tuple[int, ...],
        mask,
        scale: float,
        rpb: Optional[nn.Parameter] = None,
        proj_drop: Optional[nn.Module] = None,
        attn_drop: Optional[nn.Dropout] = None,
        layout: str = "auto",
    ):
        super().__init__()
        self.heads, self.head_dim = heads, check_heads(qkv.in_features, heads)
        self.grid, self.scale = tuple(grid), float(scale)
        self.qkv = qkv
        if rpb is not None:
            self.rpb = rpb
        self.table = MaskTable(mask, heads, grid=self.grid, layout=layout).to(qkv.weight.device)
        self.attn_drop_p = float(attn_drop.p) if attn_drop is not None else 0.0
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.grid) + 2 or tuple(x.shape[1:-1]) != self.grid:
            raise InvalidArgument(
                f"{type(self).__name__} was converted for (B, {', '.join(map(str, self.grid))}, C) "
                f"inputs, got shape {tuple(x.shape)}: its mask table is static; convert the model "
                f"again with example inputs of this size"
            )
        if self.training and self.attn_drop_p > 0:
            raise InvalidArgument(
                f"this layer replaced a NATTEN module with attention dropout p={self.attn_drop_p}, "
                f"which edgeattn's attention does not apply: run it in eval mode"
            )
        B, C = x.shape[0], x.shape[-1]
        q, k, v = split_qkv(self.qkv(x.reshape(B, -1, C)), self.heads, self.head_dim)
        out = self.table(q, k, v, scale=self.scale, rpb=getattr(self, "rpb", None))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, *self.grid, C)))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, grid={self.grid}, scale={self.scale:g}"


def convert(module: nn.Module, example_inputs: tuple, layout: str) -> list[str]:
    """Replace every NATTEN neighborhood-attention module in ``module`` (see the module docstring); one line each."""
    found = _find(module)
    if not found:
        return []
    grids = _record_grids(module, found, example_inputs)
    lines, masks = [], {}
    with tables.reuse():  # modules with the same mask and grid share one table
        for paths, source, ndim in found:
            spec = _read(paths[0], source, ndim)
            grid = grids[paths[0]]
            layer = _build(paths[0], spec, grid, layout, masks)
            layer.train(source.training)  # a new module starts in training mode: take the original's
            for path in paths:  # a module registered under several names is replaced under each
                parent_path, _, child = path.rpartition(".")
                setattr(module.get_submodule(parent_path), child, layer)
                api = f"natten.{spec['class']}" + (f" ({LEGACY})" if spec["legacy"] else "")
                lines.append(
                    f"{path}: {api} -> edgeattn {layer.table.mask.name} "
                    f"({'x'.join(map(str, grid))}, {layer.table.layout})"
                )
    return lines


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is itself a NATTEN module, which :func:`convert` replaces in its parent."""
    return _natten_class(module) is not None


def _natten_class(m: nn.Module) -> Optional[type]:
    """The NATTEN class ``m`` is (or subclasses), or None."""
    return next((cls for cls in type(m).__mro__ if cls.__name__ in CLASS_NAMES), None)


def _find(module: nn.Module) -> list[tuple[list[str], nn.Module, int]]:
    """(paths, module, grid rank) of every NATTEN module; a clear error for one that cannot be replaced."""
    by_id: dict[int, tuple[list[str], nn.Module, int]] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        cls = _natten_class(m)
        if cls is None:
            continue
        name = type(m).__name__
        if not path:  # edgeattn.convert gives such a module a parent first (is_layer)
            raise InvalidArgument(
                f"this converter replaces NATTEN modules inside their parent and was given a {name} "
                f"itself: call edgeattn.convert(module, x), which returns its replacement"
            )
        if type(m).forward is not cls.forward:
            raise ExportFailed(
                f"{path}: {name} subclasses NATTEN's {cls.__name__} but overrides forward, so "
                f"what it computes is unknown to convert; convert a plain {cls.__name__}, or build "
                f"the layer from edgeattn.MaskedSelfAttention"
            )
        by_id.setdefault(id(m), ([], m, CLASS_NAMES[cls.__name__]))[0].append(path)
    return list(by_id.values())


def _record_grids(module: nn.Module, found, example_inputs: tuple) -> dict[str, tuple[int, ...]]:
    """Run ``module`` once on the example inputs (eval mode, no grad) and return each NATTEN module's grid."""
    shapes: dict[str, set] = {paths[0]: set() for paths, _, _ in found}
    entered: list[str] = []

    def hook(path):
        def record(_, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            shapes[path].add(tuple(x.shape) if isinstance(x, torch.Tensor) else None)
            entered.append(path)

        return record

    handles = [m.register_forward_pre_hook(hook(paths[0]), with_kwargs=True) for paths, m, _ in found]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():  # natten's CPU (flex) backend runs without autograd only
            module(*example_inputs)
    except Exception as e:
        where = f" (in or after {entered[-1]})" if entered else ""
        raise ExportFailed(
            f"convert runs the model once on the example inputs to learn each NATTEN module's grid, "
            f"and that run failed{where}: {type(e).__name__}: {first_line(e)}"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    grids = {}
    for paths, m, ndim in found:
        seen = shapes[paths[0]]
        if not seen:
            raise InvalidArgument(
                f"{paths[0]}: this {type(m).__name__} did not run on the example inputs, so its "
                f"grid is unknown; pass example inputs that reach it"
            )
        axes = {s[1:-1] if s is not None and len(s) == ndim + 2 else None for s in seen}
        if None in axes:
            raise ExportFailed(
                f"{paths[0]}: {type(m).__name__} takes one (B, {_axes(ndim)}, C) tensor, got {sorted(seen, key=str)}"
            )
        if len(axes) > 1:
            raise ExportFailed(
                f"{paths[0]}: ran on several grids ({', '.join(sorted(map(_fmt, axes)))}); edgeattn "
                f"tables are static, one grid per module: convert a model that runs each module "
                f"at one size"
            )
        grids[paths[0]] = axes.pop()
    return grids


def _read(path: str, m: nn.Module, ndim: int) -> dict:
    """What the module computes, from its attributes; a clear error for anything missing or not representable."""
    name = type(m).__name__
    legacy = hasattr(m, "rpb")
    try:
        qkv, proj = m.qkv, m.proj
        heads, scale = m.num_heads, float(m.scale)
        kernel, dilation = m.kernel_size, getattr(m, "dilation", 1) or 1
        stride, causal = getattr(m, "stride", 1), getattr(m, "is_causal", False)
    except AttributeError as e:
        raise ExportFailed(
            f"{path}: {name} lacks {e.name!r}, which NATTEN's modules have; convert knows "
            f"natten 0.14-0.21's NeighborhoodAttention1D/2D/3D"
        ) from None
    if hasattr(m, "kernel_size_d"):  # natten 0.14's 3-D module: depth kernel and dilation apart
        kernel = (m.kernel_size_d or kernel, kernel, kernel)
        dilation = (getattr(m, "dilation_d", None) or dilation, dilation, dilation)
    if (
        not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear))
        or qkv.out_features != 3 * qkv.in_features
        or (proj.in_features, proj.out_features) != (qkv.in_features, qkv.in_features)
    ):
        raise ExportFailed(
            f"{path}: {name}'s qkv must be a Linear C -> 3C and proj a Linear C -> C, got {qkv} and {proj}"
        )
    if not isinstance(heads, int) or heads < 1 or qkv.in_features % heads:
        raise ExportFailed(f"{path}: {name}.num_heads={heads!r} does not divide its width {qkv.in_features}")
    rpb = m.rpb if legacy else None
    if rpb is not None:
        want = (heads, *[2 * k - 1 for k in _tuple(kernel, ndim)])
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != want:
            raise ExportFailed(
                f"{path}: {name}.rpb must be a (heads, 2k-1, ...) table of shape {want}, got "
                f"{getattr(rpb, 'shape', rpb)}"
            )
    attn_drop = getattr(m, "attn_drop", None)
    if isinstance(attn_drop, nn.Dropout) and attn_drop.p > 0 and m.training:
        raise InvalidArgument(
            f"{path}: {name} applies attention dropout (p={attn_drop.p}) in training mode, which "
            f"edgeattn's attention does not do; call .eval() on the model before convert"
        )
    return {
        "class": name,
        "legacy": legacy,
        "qkv": qkv,
        "proj": proj,
        "heads": heads,
        "scale": scale,
        "kernel": _tuple(kernel, ndim),
        "dilation": _tuple(dilation, ndim),
        "stride": _tuple(stride, ndim),
        "causal": _tuple(causal, ndim),
        "rpb": rpb,
        "proj_drop": getattr(m, "proj_drop", None),
        "attn_drop": attn_drop if isinstance(attn_drop, nn.Dropout) else None,
    }


def _build(path: str, spec: dict, grid: tuple[int, ...], layout: str, masks: dict) -> NeighborhoodAttention:
    """The edgeattn layer for one module; errors name the module."""
    if spec["legacy"] and any(k * d > n for k, d, n in zip(spec["kernel"], spec["dilation"], grid)):
        raise ExportFailed(
            f"{path}: grid {_fmt(grid)} is smaller than kernel x dilation "
            f"{_fmt(tuple(k * d for k, d in zip(spec['kernel'], spec['dilation'])))} on some axis; "
            f"NATTEN 0.14 zero-pads such inputs (later versions refuse them) and edgeattn does not "
            f"reproduce that padding: use inputs at least that large"
        )
    key = tuple(spec[k] for k in ("kernel", "dilation", "stride", "causal")) + (spec["rpb"] is not None,)
    try:
        if key not in masks:  # one Mask object per configuration, so tables.reuse() shares their tables
            masks[key] = neighborhood(*key[:4], rpb=key[4])
        return NeighborhoodAttention(
            spec["qkv"],
            spec["proj"],
            spec["heads"],
            grid,
            masks[key],
            spec["scale"],
            spec["rpb"],
            spec["proj_drop"],
            spec["attn_drop"],
            layout,
        )
    except ValueError as e:
        raise ExportFailed(
            f"{path}: {spec['class']}(kernel={spec['kernel']}, dilation={spec['dilation']}, "
            f"stride={spec['stride']}, causal={spec['causal']}, rpb={key[4]}) on grid {_fmt(grid)} "
            f"cannot be converted: {first_line(e)}"
        ) from None


def _tuple(value, ndim: int) -> tuple:
    """An int/bool or per-axis sequence -> a tuple of ``ndim`` plain Python values (neighborhood() checks them)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    return tuple(
        bool(v) if isinstance(v, bool) else int(v) if isinstance(v, (int, torch.Tensor)) else v for v in values
    )


def _axes(ndim: int) -> str:
    return ", ".join(("D", "H", "W")[3 - ndim :]) if ndim > 1 else "L"


def _fmt(grid) -> str:
    return "x".join(map(str, grid))


__all__ = ["NeighborhoodAttention", "convert", "is_layer"]
