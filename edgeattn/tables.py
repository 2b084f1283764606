"""Compile a Mask for a fixed shape into a static table: the only place index/mask arrays are produced.

A table is what an attention layer carries as a non-persistent buffer and what export writes as initializers.

- ``DenseTable`` keeps the whole (heads, Nq, Nkv) boolean mask (1 byte per entry, a quarter of a float mask)
  and, for masks with a ``bias_mod``, a float bias of the same shape.
- ``BlockTable`` groups the queries into tiles (2-D/3-D tiles on grids) and keeps, per tile, the keys any of its
  queries may attend (a padded gather index) and a reference into a deduplicated bank of (tile x keys) mask
  blocks: attention then costs what the mask allows plus the padding, and the file stays small.
- ``BucketedTable`` splits a block table's tiles into a few buckets by how many keys they attend, each padded
  only to its own longest tile (a block table, or a small dense table when its tiles share one key prefix):
  causal, prefix-LM and document masks, whose tiles attend from a few keys to all of them, then cost about what
  they allow instead of a dense table's work.

Masks with a learned relative position bias (``Mask.rpb``) add an int32 index table instead of float values, since
the values are weights: ``bias_index`` (1, Nq, Nkv) for dense tables, ``bank_bias_index`` (P, 1, tq, K) next to the
bank of block tables (deduplicated with it).  Positions the mask does not allow hold 0.  The layer owning the
weight gathers ``weight[:, index]`` at run time (:class:`edgeattn.layers.MaskTable`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .errors import InvalidArgument
from .masks.base import Shape, as_mask, evaluate, index_grid, per_axis

LAYOUTS = ("dense", "blocked", "auto")
# "auto" takes the block table when it scores at most this fraction of what a dense table scores
AUTO_BLOCKED_MAX_WORK = 0.5
# ... and otherwise the bucketed block table when it scores at most this fraction (each bucket is one more
# attention node; the bound admits causal masks in 8 buckets, which then run faster than a dense table:
# benchmarks/RESULTS.md, 2026-11-30 (bucketed block tables for LM masks))
AUTO_BUCKETED_MAX_WORK = 0.7
# ... and a sparse block table is bucketed when that cuts its work to this fraction or less (document masks)
AUTO_BUCKETED_GAIN = 0.6
# ... for tables of at least this many (query, key) pairs: below it a dense node costs less than several nodes
AUTO_BUCKETED_MIN_PAIRS = 1024 * 1024
MAX_BUCKETS = 8
# A sparse block table whose float32 scores (one head, batch 1) exceed this runs in chunks of consecutive tiles
# (tables.chunked), one node each of about CHUNK_BYTES of scores: each op of a chunk then reads what the op before
# it wrote while it is still in cache.  Chunks made a long sliding window faster on both runtimes and a short one
# slower on onnxruntime, hence the threshold: benchmarks/RESULTS.md, 2026-12-01 (flat per-token cost to 64k tokens).
AUTO_CHUNK_BYTES = 8 * 2**20
CHUNK_BYTES = 1.5 * 2**20
DEFAULT_TILE = {1: 64, 2: 8, 3: (1, 8, 8)}  # queries per tile per grid axis when the mask gives no tiling hint
# A hinted tile larger than this many queries is flattened from its leading axes: a 3x7x7 neighborhood on 8x28x28
# ran faster on onnxruntime with 1x7x7 tiles than with 3x7x7 ones (commit 428157a, benchmarks/bench_attention.py),
# and no other tile beat 1x7x7 beyond noise since: benchmarks/RESULTS.md, 2026-12-01 (second session), na3d-block
# tiles, and 2026-12-01 (third session), sliding-block and na3d-block.
MAX_HINTED_TILE = 64

# The tables reuse() has built, by (id(mask), shape, heads, layout, tile); each entry keeps its mask alive so the
# id cannot be taken by another object while the memo exists.
_MEMO: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("edgeattn_tables_memo", default=None)

# Mask elements evaluated per step: bounds the broadcast temporaries (int64 indices) to ~64 MB on large grids.
# Public so tests (and memory-tight machines) can set it: results do not depend on it.
ROW_CHUNK_ELEMS = 8 * 1024 * 1024

# a table's allowed pairs: (head, query, key, bias or None, heads stored), what BlockTable.pairs returns
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]


@dataclass(frozen=True)
class DenseTable:
    name: str
    shape: Shape
    mask: torch.Tensor  # bool (heads or 1, Nq, Nkv)
    bias: Optional[torch.Tensor] = None  # float32 (heads or 1, Nq, Nkv)
    layout: str = "dense"
    bias_index: Optional[torch.Tensor] = None  # int32 (1, Nq, Nkv): position in the per-head rpb table
    rpb_shape: tuple[int, ...] = ()  # the per-head rpb table's shape (empty: no rpb)
    blocked_work: Optional[float] = None  # layout="auto": the work_fraction of the block table it declined

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors() + ((self.bias_index,) if self.bias_index is not None else ()))

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    @property
    def fully_masked_rows(self) -> int:
        return int((~self.mask.any(-1)).sum())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mask,) if self.bias is None else (self.mask, self.bias)


@dataclass(frozen=True)
class BlockTable:
    """Queries in T tiles of ``tq`` (padded by repeating a query of the tile), each with K keys (padded).

    Attention on a block table: gather q at ``q_index`` and k/v at ``kv_index``, score (T, tq, K) blocks, add the
    tile's bank block, softmax, multiply, then row ``q_pos[n]`` of the flattened (T*tq) output is query n.
    """

    name: str
    shape: Shape
    tile: tuple[int, ...]  # queries per tile along each grid axis (one axis for sequences)
    q_index: torch.Tensor  # int64 (T, tq): query ids of each tile
    kv_index: torch.Tensor  # int64 (T, K): key ids of each tile; padding points at key 0
    q_pos: torch.Tensor  # int64 (Nq,): flat position of each query in the (T*tq) tile output
    block: torch.Tensor  # int64 (T,): which bank entry masks each tile
    bank: torch.Tensor  # bool (P, heads or 1, tq, K): unique blocks; padding keys are False
    bank_bias: Optional[torch.Tensor] = None  # float32 (P, heads or 1, tq, K) for masks with a bias_mod
    layout: str = "blocked"
    bank_bias_index: Optional[torch.Tensor] = None  # int32 (P, 1, tq, K): position in the per-head rpb table
    rpb_shape: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors() + ((self.bank_bias_index,) if self.bank_bias_index is not None else ()))

    @property
    def full(self) -> torch.Tensor:
        """Per tile: is every (query, key) pair of its block allowed (no masking needed)?"""
        return self.bank.flatten(1).all(1)[self.block]

    @property
    def density(self) -> float:
        """Allowed (query, key) pairs over Nq x Nkv, like DenseTable.density (padded query rows not counted)."""
        counts = self._rows(self.bank.sum(-1))
        return float(counts.double().mean() / self.shape.kv_len)

    @property
    def work_fraction(self) -> float:
        """Scores computed (tiles x tq x K) over the Nq x Nkv a dense lowering computes."""
        return self.q_index.numel() * self.kv_index.shape[1] / (self.shape.q_len * self.shape.kv_len)

    @property
    def fully_masked_rows(self) -> int:
        return int((~self._rows(self.bank.any(-1))).sum())

    def _rows(self, per_bank_row: torch.Tensor) -> torch.Tensor:
        """(P, heads or 1, tq) values per bank row -> (heads or 1, Nq) per query, in query order."""
        return per_bank_row[self.block].transpose(0, 1).flatten(1)[:, self.q_pos]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        base = (self.q_index, self.kv_index, self.q_pos, self.bank, self.block)
        return base if self.bank_bias is None else base + (self.bank_bias,)

    def pairs(self) -> Pairs:
        """(head, query, key, bias or None, heads stored) of every allowed pair: padding keys point at key 0 and
        are never allowed, so scattering these cannot overwrite key 0."""
        blocks = self.bank[self.block].transpose(0, 1)  # (heads, T, tq, K)
        h, t, i, j = blocks.nonzero(as_tuple=True)
        values = None if self.bank_bias is None else self.bank_bias[self.block].transpose(0, 1)[h, t, i, j]
        return h, self.q_index[t, i], self.kv_index[t, j], values, self.bank.shape[1]

    def to_dense(self) -> DenseTable:
        """The dense table this block table encodes (what the tests compare with ``materialize()``)."""
        heads, size = self.bank.shape[1], (self.shape.q_len, self.shape.kv_len)
        h, q, kv, values, _ = self.pairs()
        mask = torch.zeros(heads, *size, dtype=torch.bool)
        mask[h, q, kv] = True
        bias = bias_index = None
        if values is not None:
            bias = torch.zeros(heads, *size)
            bias[h, q, kv] = values
        if self.bank_bias_index is not None:
            t, i, j = self.bank[self.block].transpose(0, 1).nonzero(as_tuple=True)[1:]
            bias_index = torch.zeros(1, *size, dtype=torch.int32)
            bias_index[0, q, kv] = self.bank_bias_index[self.block][t, 0, i, j]
        return DenseTable(self.name, self.shape, mask, bias, bias_index=bias_index, rpb_shape=self.rpb_shape)


@dataclass(frozen=True)
class DenseBucket:
    """Some queries (``rows``) that attend, in all, one list of keys (``keys``): a dense table over just those,
    (heads or 1, len(rows), len(keys)), run as a dense-table attention node on the gathered rows and keys."""

    rows: torch.Tensor  # int64 (n,): query ids
    keys: torch.Tensor  # int64 (K,): key ids, ascending
    table: DenseTable  # its shape is (n, K)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + _nbytes([self.rows, self.keys])

    def work(self, shape: Shape) -> float:
        return len(self.rows) * len(self.keys) / (shape.q_len * shape.kv_len)

    def pairs(self) -> Pairs:
        """(head, query, key, bias or None, heads stored) of every allowed pair (see BlockTable.pairs)."""
        h, i, j = self.table.mask.nonzero(as_tuple=True)
        values = None if self.table.bias is None else self.table.bias[h, i, j]
        return h, self.rows[i], self.keys[j], values, self.table.mask.shape[0]


@dataclass(frozen=True)
class BucketedTable:
    """A block table's query tiles in buckets of similar key counts, each padded only to its own longest tile.

    A bucket is a :class:`BlockTable` over its tiles (each tile gathers its own keys; its ``q_pos`` is the identity
    on its T_b * tq rows), or a :class:`DenseBucket` when its tiles attend, in all, no more keys than its longest
    tile (causal, prefix-LM: a key prefix), so one dense node serves them.  Attention runs each bucket,
    concatenates their rows and takes row ``q_pos[n]`` for query n."""

    name: str
    shape: Shape
    buckets: tuple  # BlockTable or DenseBucket
    q_pos: torch.Tensor  # int64 (Nq,): row of query n in the buckets' concatenated rows
    layout: str = "bucketed"
    rpb_shape: tuple[int, ...] = ()
    bank_bias_index: Optional[torch.Tensor] = None  # never: masks with a learned rpb are not bucketed
    by: str = "key count"  # how the tiles were grouped, for the export's reasons

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets) + _nbytes([self.q_pos])

    @property
    def work_fraction(self) -> float:
        return sum(b.work(self.shape) if isinstance(b, DenseBucket) else b.work_fraction for b in self.buckets)

    @property
    def density(self) -> float:
        return self.to_dense().density

    @property
    def fully_masked_rows(self) -> int:
        return self.to_dense().fully_masked_rows

    def to_dense(self) -> DenseTable:
        """The dense table the buckets encode (each query belongs to one bucket)."""
        pairs = [b.pairs() for b in self.buckets]
        heads = max(p[4] for p in pairs)
        mask = torch.zeros(heads, self.shape.q_len, self.shape.kv_len, dtype=torch.bool)
        bias = None if all(p[3] is None for p in pairs) else torch.zeros(mask.shape)
        for h, q, kv, values, hm in pairs:
            h = torch.arange(heads)[:, None] if hm < heads else h[None]  # a bucket stored for all heads at once
            mask[h, q, kv] = True
            if values is not None:
                assert bias is not None  # made above when any bucket has values
                bias[h, q, kv] = values
        return DenseTable(self.name, self.shape, mask, bias)


def bucketed(table: BlockTable, max_buckets: int = MAX_BUCKETS) -> BucketedTable:
    """Split ``table``'s tiles into at most ``max_buckets`` buckets of tiles with similar key counts, chosen to
    minimize the scores computed (each bucket pads its tiles to its longest one)."""
    counts = _key_counts(table)
    order = torch.argsort(counts, stable=True)
    groups = _partition(counts[order], max_buckets)
    buckets: list[BlockTable | DenseBucket] = []
    rows = torch.empty(table.q_index.numel(), dtype=torch.long)
    start_row = 0
    tq = table.q_index.shape[1]
    for lo, hi in groups:
        tiles = order[lo:hi].sort().values  # keep tile order inside a bucket
        width = int(counts[tiles].max())
        kv_index = table.kv_index[tiles, :width]
        blocks = table.bank[table.block[tiles]][..., :width]
        bias = None if table.bank_bias is None else table.bank_bias[table.block[tiles]][..., :width]
        shared = kv_index[blocks.flatten(1, 2).any(1)].unique()  # every key any tile of the bucket attends
        n = len(tiles) * tq
        if len(shared) == width:  # causal, prefix-LM: one key list serves every tile: a dense bucket
            mask, values = _on_shared_keys(kv_index, blocks, bias, shared)
            part = DenseTable(
                table.name, Shape.of(n, width), _squeeze_heads(mask), None if values is None else _squeeze_heads(values)
            )
            buckets.append(DenseBucket(table.q_index[tiles].flatten(), shared, part))
        else:
            bank, block, bank_bias, _ = _dedupe(blocks, bias)
            bank, bank_bias = _squeeze_bank_heads(bank, bank_bias)
            buckets.append(
                BlockTable(
                    table.name,
                    table.shape,
                    table.tile,
                    table.q_index[tiles].contiguous(),
                    kv_index.contiguous(),
                    torch.arange(n),
                    block,
                    bank,
                    bank_bias,
                )
            )
        # tile t's rows in the original (T*tq) layout now sit at start_row + its rank in the bucket
        rows.view(-1, tq)[tiles] = start_row + torch.arange(n).view(-1, tq)
        start_row += n
    return BucketedTable(table.name, table.shape, tuple(buckets), rows[table.q_pos].contiguous())


def chunked(table: BlockTable, tiles: int) -> BucketedTable:
    """``table``'s tiles in groups of ``tiles`` consecutive tiles, each group a block table of its own (one
    attention node): the same pairs, scored a group at a time.  The groups keep the tiles in order, so their rows,
    concatenated, are the table's own rows and its ``q_pos`` still finds each query."""
    count, tq = table.q_index.shape
    buckets = []
    for lo in range(0, count, tiles):
        group = slice(lo, min(count, lo + tiles))
        buckets.append(
            BlockTable(
                table.name,
                table.shape,
                table.tile,
                table.q_index[group].contiguous(),
                table.kv_index[group].contiguous(),
                torch.arange(table.q_index[group].numel()),
                table.block[group].contiguous(),
                table.bank,
                table.bank_bias,
            )
        )
    return BucketedTable(
        table.name,
        table.shape,
        tuple(buckets),
        table.q_pos,
        by=f"position, {tiles} tiles each (scores that stay in cache)",
    )


def _in_chunks(table: BlockTable):
    """``table`` in chunks where its scores outgrow the cache (see :data:`AUTO_CHUNK_BYTES`), else itself."""
    count, tq = table.q_index.shape
    row_bytes = tq * table.kv_index.shape[1] * 4
    if count * row_bytes <= AUTO_CHUNK_BYTES:
        return table
    return chunked(table, max(1, int(CHUNK_BYTES // row_bytes)))


def _on_shared_keys(kv_index, blocks, bias, shared):
    """A bucket's (t, heads, tq, K) blocks over one key list ``shared`` (K keys, ascending) -> its mask and bias
    (heads, t * tq, K) as a dense table over the bucket's rows and those keys."""
    t, hm, tq, k = blocks.shape
    column = torch.searchsorted(shared, kv_index)  # (t, K): where each listed key sits in shared
    allowed = blocks.transpose(0, 1).reshape(hm, t * tq, k)
    moved = torch.zeros(hm, t * tq, k, dtype=torch.bool)
    index = column.repeat_interleave(tq, 0).expand(hm, -1, -1)
    # padding entries are never allowed (and may point at key 0): scatter the allowed entries with "or"
    moved.scatter_reduce_(2, index, allowed, "amax")
    moved_bias = None
    if bias is not None:
        values = torch.where(blocks, bias, 0.0).transpose(0, 1).reshape(hm, t * tq, k)
        moved_bias = torch.zeros(hm, t * tq, k).scatter_add_(2, index, values)
    return moved, moved_bias


def _key_counts(table: BlockTable) -> torch.Tensor:
    """(T,) keys each tile attends (at least 1): its allowed keys come first, padding after."""
    per_bank = table.bank.flatten(1, 2).any(1).sum(1)  # (P,)
    return per_bank[table.block].clamp(min=1)


def _partition(sorted_counts: torch.Tensor, max_parts: int) -> list[tuple[int, int]]:
    """Split ascending counts into at most ``max_parts`` contiguous runs minimizing sum(len(run) * max(run)):
    dynamic programming over the run ends."""
    c = sorted_counts.double()
    n = len(c)
    if n > 2048:  # the (n x n) step would be large: equal runs of the sorted tiles
        runs = min(max_parts, n)
        return [(i * n // runs, (i + 1) * n // runs) for i in range(runs)]
    inf = float("inf")
    best = torch.full((n + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    cuts = []
    idx = torch.arange(n + 1, dtype=torch.float64)
    for _ in range(min(max_parts, n)):
        # cost[i, j] = best[i] + (j - i) * c[j - 1] for i < j: the last run is i..j-1
        cost = best[:, None] + (idx[None, :] - idx[:, None]) * torch.cat([c[:1], c])[None, :]
        cost = torch.where(idx[:, None] < idx[None, :], cost, inf)
        new, arg = cost.min(0)
        new[0] = 0.0
        cuts.append(arg)
        best = new
    # walk back from n through the last layer's cuts
    parts, j = [], n
    for arg in reversed(cuts):
        if j == 0:
            break
        i = int(arg[j])
        parts.append((i, j))
        j = i
    return sorted(parts)


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Inside the block, :func:`build` returns the table it already built for the same Mask object, shape, heads,
    layout and tile: a model whose layers share one Mask (NAT's blocks of one level) evaluates it once."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def build(
    mask, q_len=None, kv_len=None, grid=None, heads: int = 1, layout: str = "dense", tile=None, buckets: bool = True
):
    """Evaluate ``mask`` (a Mask or a bare mask_mod) for one shape by broadcasting over index tensors.

    ``layout="blocked"`` returns a :class:`BlockTable`; ``tile`` (int or per-axis) overrides the mask's hint.
    ``layout="auto"`` returns the block table when its padded work is at most half the dense work, else dense;
    with ``buckets`` (masks without a learned rpb, of at least :data:`AUTO_BUCKETED_MIN_PAIRS` pairs) it returns
    the :class:`BucketedTable` instead where that scores at most :data:`AUTO_BUCKETED_MAX_WORK` of the dense work
    (over a dense table) or :data:`AUTO_BUCKETED_GAIN` of the block table's (over a block table), and a large
    block table in chunks (:func:`chunked`, above :data:`AUTO_CHUNK_BYTES` of scores)."""
    if layout not in LAYOUTS:
        raise InvalidArgument(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    mask = as_mask(mask)
    shape = Shape.of(q_len, kv_len, grid)
    if layout == "auto":
        blocked = _memoized(mask, shape, heads, "blocked", tile)
        sparse = blocked.work_fraction <= AUTO_BLOCKED_MAX_WORK
        counts = _key_counts(blocked)
        # bucketing pays where tiles attend very different numbers of keys (at best: the mean over the longest)
        if (
            buckets
            and mask.rpb is None
            and shape.q_len * shape.kv_len >= AUTO_BUCKETED_MIN_PAIRS
            and float(counts.double().mean()) <= AUTO_BUCKETED_GAIN * int(counts.max())
        ):
            split = bucketed(blocked)
            if split.work_fraction <= (
                AUTO_BUCKETED_GAIN * blocked.work_fraction if sparse else AUTO_BUCKETED_MAX_WORK
            ):
                return split
        if sparse:
            return _in_chunks(blocked) if buckets and mask.rpb is None else blocked
        return dataclasses.replace(_memoized(mask, shape, heads, "dense"), blocked_work=blocked.work_fraction)
    return _memoized(mask, shape, heads, layout, tile)


def _memoized(mask, shape: Shape, heads: int, layout: str, tile=None):
    build_one = _build_blocked if layout == "blocked" else _build_dense
    memo = _MEMO.get()
    if memo is None:
        return build_one(mask, shape, heads, tile)
    key = (id(mask), shape, heads, layout, tuple(tile) if isinstance(tile, (list, tuple)) else tile)
    if key not in memo:
        memo[key] = (mask, build_one(mask, shape, heads, tile))
    return memo[key][1]


def _build_dense(mask, shape: Shape, heads: int, tile=None) -> DenseTable:
    mask_mod, bias_mod = mask.mods(shape)
    rpb_shape, index_mod = mask.rpb(shape) if mask.rpb is not None else ((), None)
    rows = max(1, ROW_CHUNK_ELEMS // shape.kv_len)
    masks, biases, indices = [], [], []
    for start in range(0, shape.q_len, rows):
        index = index_grid(shape, heads, slice(start, min(start + rows, shape.q_len)))
        masks.append(evaluate(mask_mod, index, heads, name=mask.name))
        if bias_mod is not None:
            biases.append(evaluate(bias_mod, index, heads, "bias_mod", mask.name).to(torch.float32))
        if index_mod is not None:
            indices.append(_rpb_index(mask.name, index_mod, index, heads, masks[-1], rpb_shape))
    return DenseTable(
        mask.name,
        shape,
        _squeeze_heads(torch.cat(masks, 1)),
        _squeeze_heads(torch.cat(biases, 1)) if biases else None,
        bias_index=torch.cat(indices, 1) if indices else None,
        rpb_shape=tuple(rpb_shape),
    )


def _rpb_index(name: str, index_mod, index, heads: int, allowed: torch.Tensor, rpb_shape) -> torch.Tensor:
    """The rpb_index_mod on ``index`` tensors -> int32 (1, rows, Nkv): the pair's table position where any head
    allows the pair, 0 elsewhere; positions outside the table are an error."""
    values = evaluate(index_mod, index, heads, "rpb_index_mod", name)
    if values.shape[0] != 1:
        raise InvalidArgument(
            f"{name}: rpb_index_mod must not depend on the head (each head has its own row of the "
            f"table, indexed the same way)"
        )
    entries = math.prod(rpb_shape)
    values = torch.where(allowed.any(0, keepdim=True), values, 0)
    if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < entries:
        bad = values[(values < 0) | (values >= entries)][0]
        raise InvalidArgument(
            f"{name}: rpb_index_mod gives positions outside its table of {entries} entries per head "
            f"(e.g. {int(bad)}); indices must lie in [0, {entries})"
        )
    return values.to(torch.int32)


def _squeeze_heads(t: torch.Tensor) -> torch.Tensor:
    """Store one head when every head's table is identical (the common case): the runtime broadcasts it."""
    if t.shape[0] > 1 and bool((t == t[:1]).all()):
        t = t[:1]
    return t.contiguous()


def _axis_tiles(length: int, tile: int, groups: int, offset: int) -> torch.Tensor:
    """(tiles, tile) coordinates along one axis: visit positions from ``offset`` on (cyclically), split them into
    ``groups`` interleaved groups, cut each group into runs of ``tile`` and pad the last run with its last
    position (a real query, so padded rows compute something valid and are never read back)."""
    order = (torch.arange(length) + offset) % length
    runs = []
    for g in range(groups):
        members = order[order % groups == g]
        for start in range(0, len(members), tile):
            run = members[start : start + tile]
            runs.append(torch.cat([run, run[-1:].expand(tile - len(run))]))
    return torch.stack(runs)


def _query_tiles(mask, shape: Shape, tile) -> tuple[tuple[int, ...], torch.Tensor]:
    """Tile shape and the (T, tq) query ids: the cartesian product of per-axis tiles on the (row-major) grid."""
    grid = shape.grid or (shape.q_len,)
    nd = len(grid)
    hints = mask.tiling
    hinted = tile is None
    if hinted:
        tile = hints.get("tile", DEFAULT_TILE.get(nd, 8))
    tile = [min(t, n) for t, n in zip(per_axis("tile", tile, nd, low=1), grid)]
    for axis in range(nd - 1):
        if hinted and math.prod(tile) > MAX_HINTED_TILE:
            tile[axis] = 1
    tile = tuple(tile)
    groups = per_axis("groups", hints.get("groups", 1), nd, low=1)
    offsets = per_axis("offset", hints.get("offset", 0), nd, low=0)
    if shape.grid is None and shape.q_len != shape.kv_len:
        groups, offsets = (1,), (0,)
    ids = None
    for axis, (n, t, g, o) in enumerate(zip(grid, tile, groups, offsets)):
        coords = _axis_tiles(n, t, min(g, n), o)  # (tiles_a, t)
        stride = math.prod(grid[axis + 1 :])
        part = coords * stride
        if ids is None:
            ids = part
        else:  # combine: every earlier tile with every tile of this axis
            ids = (ids[:, None, :, None] + part[None, :, None, :]).reshape(ids.shape[0] * part.shape[0], -1)
    assert ids is not None  # a grid has at least one axis
    return tile, ids


def _build_blocked(mask, shape: Shape, heads: int, tile) -> BlockTable:
    tile, q_index = _query_tiles(mask, shape, tile)
    mask_mod, bias_mod = mask.mods(shape)
    rpb_shape, index_mod = mask.rpb(shape) if mask.rpb is not None else ((), None)
    n_tiles, tq = q_index.shape
    b, h, _, kv = index_grid(shape, heads, slice(0, 1))
    per_step = max(1, ROW_CHUNK_ELEMS // (tq * shape.kv_len))
    keys, blocks, biases, indices, n_keys = [], [], [], [], 0
    for start in range(0, n_tiles, per_step):
        rows = q_index[start : start + per_step]  # (t, tq)
        q = rows.reshape(1, 1, -1, 1)
        flat_allowed = evaluate(mask_mod, (b, h, q, kv), heads, name=mask.name)
        allowed = _tiles(flat_allowed, len(rows))  # (t, hm, tq, Nkv)
        positions = None
        if index_mod is not None:
            positions = _tiles(
                _rpb_index(mask.name, index_mod, (b, h, q, kv), heads, flat_allowed, rpb_shape), len(rows)
            )  # (t, 1, tq, Nkv)
        values = None
        if bias_mod is not None:
            values = _tiles(
                evaluate(bias_mod, (b, h, q, kv), heads, "bias_mod", mask.name).to(torch.float32), len(rows)
            )
            hm = max(allowed.shape[1], values.shape[1])
            allowed, values = (t.expand(-1, hm, -1, -1) for t in (allowed, values))
        union = allowed.any(2).any(1)  # (t, Nkv)
        count = int(union.sum(1).max())
        # the allowed keys of each tile first, in key order (a stable sort of "not allowed")
        order = torch.sort((~union).to(torch.uint8), dim=1, stable=True).indices[:, :count]
        valid = torch.gather(union, 1, order)
        idx = order[:, None, None, :].expand(-1, allowed.shape[1], tq, -1)
        keys.append(torch.where(valid, order, 0))
        blocks.append(torch.gather(allowed, 3, idx) & valid[:, None, None, :])
        if values is not None:
            biases.append(torch.where(blocks[-1], torch.gather(values, 3, idx), 0.0))
        if positions is not None:
            indices.append(torch.where(valid[:, None, None, :], torch.gather(positions, 3, idx[:, :1]), 0))
        n_keys = max(n_keys, count)
    n_keys = max(n_keys, 1)  # a mask that allows nothing still gets one (masked) key per tile, not empty blocks
    kv_index = torch.cat([_pad(k, n_keys, 0) for k in keys])
    hm = max(bl.shape[1] for bl in blocks)
    block_all = torch.cat([_pad(bl, n_keys, False).expand(-1, hm, -1, -1) for bl in blocks])
    bias_all = torch.cat([_pad(bi, n_keys, 0.0).expand(-1, hm, -1, -1) for bi in biases]) if biases else None
    index_all = torch.cat([_pad(ix, n_keys, 0) for ix in indices]) if indices else None
    bank, block, bank_bias, bank_index = _dedupe(block_all, bias_all, index_all)
    bank, bank_bias = _squeeze_bank_heads(bank, bank_bias)
    q_pos = torch.empty(shape.q_len, dtype=torch.long)
    # a query may appear several times (tile padding): its first appearance is where its output is read
    flat = q_index.flatten()
    q_pos[flat.flip(0)] = torch.arange(flat.numel() - 1, -1, -1)
    return BlockTable(
        mask.name,
        shape,
        tile,
        q_index.contiguous(),
        kv_index.contiguous(),
        q_pos,
        block,
        bank,
        bank_bias,
        bank_bias_index=bank_index,
        rpb_shape=tuple(rpb_shape),
    )


def _tiles(values: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """(heads or 1, t*tq, Nkv) -> (t, heads or 1, tq, Nkv)."""
    return values.reshape(values.shape[0], n_tiles, -1, values.shape[-1]).transpose(0, 1)


def _pad(t: torch.Tensor, size: int, value) -> torch.Tensor:
    extra = size - t.shape[-1]
    if not extra:
        return t
    return torch.cat([t, torch.full(t.shape[:-1] + (extra,), value, dtype=t.dtype)], -1)


def _dedupe(blocks: torch.Tensor, biases: Optional[torch.Tensor], indices: Optional[torch.Tensor] = None):
    """Unique (mask, bias, rpb index) blocks -> bank, per-tile bank index, bank biases and bank rpb indices
    (border and interior tiles repeat)."""
    key = blocks.flatten(1).to(torch.int32)
    if biases is not None:
        key = torch.cat([key, biases.flatten(1).contiguous().view(torch.int32)], 1)
    if indices is not None:
        key = torch.cat([key, indices.flatten(1).to(torch.int32)], 1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(key), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(key)), "amin"
    )
    pick = [None if t is None else t[first].contiguous() for t in (biases, indices)]
    return blocks[first].contiguous(), inverse, *pick


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _squeeze_bank_heads(bank, bank_bias):
    if (
        bank.shape[1] > 1
        and bool((bank == bank[:, :1]).all())
        and (bank_bias is None or bool((bank_bias == bank_bias[:, :1]).all()))
    ):
        bank = bank[:, :1].contiguous()
        bank_bias = None if bank_bias is None else bank_bias[:, :1].contiguous()
    return bank, bank_bias
