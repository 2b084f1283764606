"""nn.Modules built on the masked-attention op.  Tables are non-persistent buffers: derived, never saved."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, cast

import torch
from torch import nn

from . import tables
from .attention import attend
from .errors import InvalidArgument
from .masks.base import Shape, as_mask
from .routing import check_routing, routed_attention
from .signature import TABLE_INPUTS


class MaskTable(nn.Module):
    """A mask compiled for one shape; calling it runs masked attention over its table.

    The table's tensors are non-persistent buffers named ``attn_<tensor>`` (``attn_mask``, ``attn_kv_index``...):
    they move with ``.to()`` but are never saved, since they are derived from the mask.  ``layout`` is
    ``"dense"``, ``"blocked"`` or ``"auto"`` (blocked when it computes at most half of the dense scores).
    Export switches the layout to what its plan's lowering needs (:meth:`use_layout`) for the time of the export.

    A mask with a learned relative position bias adds the buffer ``attn_rpb_index`` (the table's int32 positions,
    see :mod:`edgeattn.tables`); the module owning the weight passes it to :meth:`forward` as ``rpb``, shaped
    (heads, *rpb_shape), and the bias is gathered from it on every call, so it stays a trainable weight and the
    exported graph holds the weight and a static index (runtimes fold the Gather into a constant; the exporter
    already folds it when the index is small).
    """

    def __init__(
        self,
        mask,
        heads: int,
        grid=None,
        q_len: Optional[int] = None,
        kv_len: Optional[int] = None,
        layout: str = "auto",
        buckets: bool = True,
    ) -> None:
        super().__init__()
        self.mask = as_mask(mask)
        self.shape = Shape.of(q_len, kv_len, grid)
        self.heads = heads
        self.buckets = buckets  # may layout="auto" pick a bucketed block table (tables.BucketedTable)
        self._table_buffers: list[str] = []
        self.use_layout(layout)

    def use_layout(self, layout: str, table=None) -> None:
        """Switch to a table of ``layout``; ``table`` is one already built for this mask and shape."""
        if table is None or table.layout != layout:
            table = tables.build(
                self.mask,
                self.shape.q_len,
                self.shape.kv_len,
                self.shape.grid,
                self.heads,
                layout,
                buckets=self.buckets,
            )
        device = next((b.device for b in self.buffers()), None)
        for name in self._table_buffers:
            delattr(self, name)
        self.table = table
        rpb_index = table.bias_index if table.layout == "dense" else table.bank_bias_index
        named = [("attn_rpb_index", rpb_index)]
        for suffix, part, layout in self._parts():
            if isinstance(part, tables.DenseBucket):
                named += [(f"attn_rows{suffix}", part.rows), (f"attn_keys{suffix}", part.keys)]
                part = part.table
            named += [(f"attn_{name}{suffix}", getattr(part, name)) for name in TABLE_INPUTS[layout]]
        if isinstance(table, tables.BucketedTable):
            named.append(("attn_order", table.q_pos))
        for name, value in named:
            self.register_buffer(name, value if value is None or device is None else value.to(device), persistent=False)
        self._table_buffers = [name for name, _ in named]
        self._runs = {
            name: _run(value) for name, value in named if name.startswith(("attn_rows", "attn_keys", "attn_order"))
        }

    def _parts(self) -> list[tuple[str, object, str]]:
        """(buffer-name suffix, table, layout) of each attention node this layer runs: one, or one per bucket."""
        if isinstance(self.table, tables.BucketedTable):
            return [
                (f"_{i}" if i else "", bucket, "dense" if isinstance(bucket, tables.DenseBucket) else "blocked")
                for i, bucket in enumerate(self.table.buckets)
            ]
        return [("", self.table, self.table.layout)]

    def node_tables(self) -> list[tuple[str, object, str]]:
        """(buffer that is the node's first table input, its table, its layout) for each attention node this layer
        exports."""
        return [
            (
                f"attn_{TABLE_INPUTS[layout][0]}{suffix}",
                part.table if isinstance(part, tables.DenseBucket) else part,
                layout,
            )
            for suffix, part, layout in self._parts()
        ]

    @property
    def layout(self) -> str:
        return self.table.layout

    @property
    def table_bytes(self) -> int:
        return self.table.nbytes

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        return self.table.rpb_shape

    def forward(
        self,
        q,
        k,
        v,
        scale: Optional[float] = None,
        rpb: Optional[torch.Tensor] = None,
        softcap: Optional[float] = None,
    ) -> torch.Tensor:
        """Attention over this table; ``softcap`` caps the scaled scores (see :func:`edgeattn.attention.attend`)."""
        if isinstance(self.table, tables.BucketedTable):  # no rpb: tables.build never buckets such masks
            if rpb is not None:
                raise InvalidArgument(f"mask {self.mask.name} has no relative position bias table, but rpb was given")
            rows = torch.cat(
                [self._bucket(q, k, v, suffix, layout, scale, softcap) for suffix, _, layout in self._parts()], 2
            )
            return self._select(rows, "attn_order")
        tensors = [getattr(self, f"attn_{name}") for name in TABLE_INPUTS[self.layout]]
        if self.attn_rpb_index is not None:
            learned = self.gather_rpb(rpb, q.shape[1])
            tensors[-1] = learned if tensors[-1] is None else tensors[-1] + learned
        elif rpb is not None:
            raise InvalidArgument(
                f"mask {self.mask.name} has no relative position bias table, but rpb was given; "
                "build the mask with rpb=True"
            )
        return attend(q, k, v, self.layout, tensors, scale, self.mask.name, softcap)

    def _bucket(self, q, k, v, suffix: str, layout: str, scale, softcap):
        """One bucket's rows: a block table's tile rows, or a dense bucket's queries over its shared keys."""
        tensors = [getattr(self, f"attn_{name}{suffix}") for name in TABLE_INPUTS[layout]]
        if layout == "dense":
            q = self._select(q, f"attn_rows{suffix}")
            k, v = self._select(k, f"attn_keys{suffix}"), self._select(v, f"attn_keys{suffix}")
        return attend(q, k, v, layout, tensors, scale, self.mask.name, softcap)

    def _select(self, x: torch.Tensor, buffer: str) -> torch.Tensor:
        """``x[:, :, index]`` for the index in ``buffer``.  A run of consecutive ids (a causal bucket's rows and
        key prefix, the identity order of buckets that keep their tiles in order) is a ``narrow``: the graph gets
        a Slice, or nothing, not a Gather that copies.  The runs are read off the table when it is built, since
        the buffers are not concrete while an exporter traces."""
        run = self._runs.get(buffer)
        if run is None:
            return x.index_select(2, getattr(self, buffer))
        start, length = run
        return x if start == 0 and length == x.shape[2] else x.narrow(2, start, length)

    def gather_rpb(self, rpb: Optional[torch.Tensor], heads: int) -> torch.Tensor:
        """The learned table (heads, *rpb_shape) -> the bias tensor of this layout: (heads, Nq, Nkv) for dense
        tables, (P, heads, tq, K) next to the bank of block tables."""
        want = (heads, *self.rpb_shape)
        if rpb is None or rpb.shape[0] != heads or rpb[0].numel() != math.prod(self.rpb_shape):
            got = "nothing" if rpb is None else f"shape {tuple(rpb.shape)}"
            raise InvalidArgument(
                f"mask {self.mask.name} takes its learned relative position bias as rpb= with shape "
                f"{want} (or (heads, {math.prod(self.rpb_shape)})), got {got}"
            )
        index = cast(torch.Tensor, self.attn_rpb_index)  # a buffer, not None: the table has an rpb_shape
        values = rpb.reshape(heads, -1).index_select(1, index.flatten()).unflatten(1, index.shape)
        return values[:, 0] if self.layout == "dense" else values[:, :, 0].transpose(0, 1)

    def extra_repr(self) -> str:
        return f"mask={self.mask.name}, layout={self.layout}, tokens={self.shape.q_len}x{self.shape.kv_len}"


def _run(index: torch.Tensor) -> Optional[tuple[int, int]]:
    """(start, length) when ``index`` lists consecutive ids, else None."""
    start = int(index[0]) if len(index) else 0
    return (start, len(index)) if torch.equal(index.cpu(), torch.arange(start, start + len(index))) else None


def check_heads(dim: int, heads: int, name: str = "dim", even_width: bool = False) -> int:
    """The width of one head, ``dim // heads``; a clear error unless ``heads`` is a positive divisor of ``dim``
    (``name`` is what the caller calls ``dim``).  ``even_width``: heads must also be of an even width, as rotary
    embeddings (RoPE, RMT's theta shift) rotate channel pairs."""
    if heads < 1 or dim % heads:
        raise InvalidArgument(f"heads must be a positive divisor of {name}={dim}, got {heads}")
    head_dim = dim // heads
    if even_width and head_dim % 2:
        raise InvalidArgument(
            f"{name}={dim} must split into {heads} heads of an even width (rotary embeddings rotate "
            f"channel pairs), got head width {head_dim}"
        )
    return head_dim


def split_qkv(qkv: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed q/k/v projection (B, N, 3 * heads * head_dim) -> q, k, v, each (B, heads, N, head_dim)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over ``N`` tokens with a static mask compiled for one shape.

    ``grid`` lays the tokens on a 1-3D grid (row-major) for grid masks; ``seq_len`` gives N for sequence masks.
    Input and output are (B, N, dim).

    A mask with a learned relative position bias (``neighborhood(7, rpb=True)``) gets its table as the parameter
    ``rpb``, (heads, *table shape), initialised as NAT does (truncated normal, std 0.02).  ``rpb=False`` leaves
    it to a subclass that owns a reference's own parameter and overrides :meth:`relative_bias`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mask,
        grid=None,
        seq_len: Optional[int] = None,
        qkv_bias: bool = True,
        proj: bool = True,
        layout: str = "auto",
        rpb: bool = True,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, check_heads(dim, heads)
        if grid is None and seq_len is None:
            raise InvalidArgument(
                f"{type(self).__name__} compiles its mask for a fixed number of tokens: pass "
                "seq_len=N for a sequence or grid=(H, W) (1-3 axes) for tokens on a grid"
            )
        self.table = MaskTable(mask, heads, grid=grid, q_len=seq_len, layout=layout)
        self.mask, self.seq_len = self.table.mask, self.table.shape.q_len
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rpb and self.mask.rpb is not None:
            self.rpb = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, *self.table.rpb_shape), std=0.02))
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def relative_bias(self) -> Optional[torch.Tensor]:
        """The learned relative position bias table, (heads, ...), or None for masks without one."""
        return getattr(self, "rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if N != self.seq_len:
            raise InvalidArgument(
                f"{type(self).__name__} was built for {self.seq_len} tokens, got {N}: the mask "
                "tables are static, build the layer for this shape"
            )
        q, k, v = split_qkv(self.qkv(x), self.heads, self.head_dim)
        out = self.table(q, k, v, rpb=self.relative_bias())
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


class RoutedSelfAttention(nn.Module):
    """Multi-head self-attention whose key blocks each query attends are chosen from the content (MoBA by default,
    or ``router``; see :func:`edgeattn.routing.routed_attention`).  Input and output are (B, N, dim), N a multiple
    of ``block``; nothing is compiled for a shape, so one layer serves every such N."""

    def __init__(
        self, dim: int, heads: int, block: int, top_k: int, causal: bool = True, router=None, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, check_heads(dim, heads)
        check_routing(block, top_k)
        self.block, self.top_k, self.causal, self.router = block, top_k, causal, router
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = split_qkv(self.qkv(x), self.heads, self.head_dim)
        out = routed_attention(q, k, v, self.block, self.top_k, self.causal, self.router)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, block={self.block}, top_k={self.top_k}, "
            f"causal={self.causal}"
        )


class Mlp(nn.Sequential):
    """Linear, GELU, Linear.  ``named=True`` names them fc1 / act / fc2 as timm-style references (NAT, Swin) do,
    so their checkpoints load; the default keeps positional names (``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, ratio: float = 4.0, named: bool = False) -> None:
        hidden = int(dim * ratio)
        layers = [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)]
        if named:
            super().__init__(OrderedDict(zip(("fc1", "act", "fc2"), layers)))
        else:
            super().__init__(*layers)


class MaskedBlock(nn.Module):
    """Pre-norm transformer block (NAT / Swin / ViT style): x + attn(norm(x)), then x + mlp(norm(x)).

    ``attention`` is the attention class (a MaskedSelfAttention subclass for a reference's own parameter names);
    ``named_mlp`` names the MLP's layers fc1 / fc2."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mask,
        grid=None,
        seq_len: Optional[int] = None,
        mlp_ratio: float = 4.0,
        layout: str = "auto",
        attention: type = MaskedSelfAttention,
        named_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, heads, mask, grid=grid, seq_len=seq_len, layout=layout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, named=named_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linear(module: nn.Module) -> None:
    """The references' (timm) initialization of every Linear: truncated normal weights (std 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
