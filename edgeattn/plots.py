"""Pictures: masks, compiled tables and benchmark latencies, as PNG files or matplotlib Figures.

- :func:`plot_mask`: a mask for one shape.  On a sequence (or a 1-D grid), the whole query x key pattern; on a
  2-D grid, the keys one query attends laid on the grid; on a 3-D grid, one panel per slice along its first axis
  that holds the query or a key it attends (at most :data:`MAX_SLICES`).  Cells are :func:`edgeattn.materialize`'s,
  head 0; a mask's bias is not drawn.
- :func:`plot_table`: a compiled table.  A block table as query tiles x key blocks (:func:`block_image`): white
  where the tile gathers no key of the block (skipped), light where it scores them but some pairs are masked, dark
  where every pair it scores is allowed, with the share of the dense scores it computes (its ``work_fraction``,
  padding included) in the title.  A dense table as its mask, head 0.
- :func:`plot_file_tables`: :func:`plot_table` for each distinct table stored in an exported .onnx file, read
  from its initializers (``inspect --plot``).
- :func:`plot_bench`: ``bench --plot``'s latency chart.

matplotlib is the optional ``[plot]`` extra: it is imported inside the functions, and a missing one is one error
naming the extra.  Figures are made without pyplot, so drawing switches no backend and keeps no global state.
Patterns larger than :data:`MAX_CELLS` per side are drawn as the share of allowed pairs in each cell.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import inspection
from .errors import BadFile, EdgeAttnError, InvalidArgument, RuntimeUnavailable
from .files import atomic_write, check_writable
from .masks import as_mask, from_params, parse_value
from .masks.base import Shape, evaluate, index_grid
from .tables import ROW_CHUNK_ELEMS, BlockTable, DenseTable

MAX_CELLS = 512  # drawn cells per side at most; larger patterns are averaged into blocks
MAX_SLICES = 8  # 3-D grids: panels at most (the slices nearest the query's)
DPI = 100
ALLOWED_CMAP = "Blues"  # 0 (masked) white .. 1 (allowed) dark blue
# block tables: skipped, computed but partly masked, computed and all allowed
BLOCK_COLORS = ("white", "#9ecae1", "#08519c")
BLOCK_LABELS = ("skipped", "computed, partly masked", "computed, all allowed")


def require_matplotlib(what: str = "drawing pictures") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable(f"{what} needs matplotlib; install it with: pip install 'edgeattn[plot]'") from None


# ----------------------------------------------------------------------------- masks
def plot_mask(mask, grid=None, q_len: Optional[int] = None, kv_len: Optional[int] = None, query=None, path=None):
    """Draw ``mask`` (a Mask or a bare ``mask_mod(b, h, q_idx, kv_idx)``) for one shape; returns the Figure and
    writes it as PNG to ``path`` when given.

    ``grid`` with 2 or 3 axes: the keys of one ``query``, a flat index or coordinates; by default the query one step
    in from the first corner (coordinate 1 on every axis), where neighborhoods shift and Swin's shifted windows
    split into regions (pass the centre to see an unshifted window).  The query is marked with a red dot.  The drawn
    array is ``fig.axes[i].images[0].get_array()``, one axes per panel."""
    require_matplotlib("plot_mask")
    mask = as_mask(mask)
    shape = Shape.of(q_len, kv_len, grid)
    mask_mod, bias_mod = mask.mods(shape)
    note = " (its bias is not drawn)" if bias_mod is not None else ""
    if shape.grid is None or len(shape.grid) == 1:
        if query is not None:
            raise InvalidArgument("query picks one token of a 2-D or 3-D grid; a sequence mask is drawn whole")
        rows = max(1, ROW_CHUNK_ELEMS // shape.kv_len)  # in row chunks, as tables are built: long sequences fit
        allowed = torch.cat(
            [
                evaluate(mask_mod, index_grid(shape, q_rows=slice(start, start + rows)), 1, name=mask.name)[0]
                for start in range(0, shape.q_len, rows)
            ]
        ).numpy()
        fig = _pattern(
            allowed,
            f"{mask.name}{note}\n{shape.q_len} queries x {shape.kv_len} keys, {allowed.mean():.1%} allowed",
            "key",
            "query",
        )
    else:
        fig = _query_view(mask, mask_mod, shape, _query(query, shape.grid), note)
    if path is not None:
        _save(fig, path)
    return fig


def draw_family(
    family: str, params: Sequence[str] = (), grid=None, q_len: Optional[int] = None, query=None, path=None
) -> Path:
    """``edgeattn masks show``: a registered family with ``NAME=VALUE`` parameters (:func:`masks.from_params`) on
    a grid (``"14x14"``) or a sequence of ``q_len`` tokens, drawn by :func:`plot_mask` to ``path`` (default
    ``<mask name>.png``); ``query`` may be written ``"17"`` or ``"3,5"``.  Returns the path written."""
    require_matplotlib("masks show")
    if (grid is None) == (q_len is None):
        raise InvalidArgument("give a token grid (--grid HxW, HxWxD) or a sequence length (--len N), one of the two")
    mask = from_params(family, params)
    path = check_writable(path or f"{mask.name}.png")
    plot_mask(mask, grid=_parsed("grid", grid), q_len=q_len, query=_parsed("query", query), path=path)
    return path


def _parsed(label: str, value):
    """A grid or query as written on the command line (``14x14``, ``3,5``, ``17``); other values as they are."""
    try:
        return parse_value(value) if isinstance(value, str) else value
    except ValueError as e:
        raise InvalidArgument(f"{label} {value!r}: {e}") from None


def _query(query, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The query's coordinates on ``grid``, from a flat index, coordinates or None (the default query)."""
    if query is None:
        return tuple(min(1, n - 1) for n in grid)
    n = int(np.prod(grid))
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool) and 0 <= query < n:
        return tuple(int(c) for c in np.unravel_index(int(query), grid))
    if (
        isinstance(query, (tuple, list))
        and len(query) == len(grid)
        and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < s for c, s in zip(query, grid)
        )
    ):
        return tuple(int(c) for c in query)
    raise InvalidArgument(
        f"query {query!r} is not a token of the {'x'.join(map(str, grid))} grid: give a flat index "
        f"in [0, {n}) or {len(grid)} coordinates"
    )


def _query_view(mask, mask_mod, shape: Shape, coords: tuple[int, ...], note: str):
    grid = shape.grid
    flat = int(np.ravel_multi_index(coords, grid))
    # one query's row only: cheap on grids whose full mask would not fit in memory
    row = evaluate(mask_mod, index_grid(shape, q_rows=slice(flat, flat + 1)), 1, name=mask.name)[0, 0]
    keys = row.numpy().reshape(grid)
    title = f"{mask.name} on {'x'.join(map(str, grid))}{note}\nquery {coords} attends {int(keys.sum())} keys"
    if len(grid) == 2:
        panels = [(None, keys)]
    else:  # the slices that hold the query or one of its keys, at most MAX_SLICES nearest the query's
        used = [t for t in range(grid[0]) if keys[t].any() or t == coords[0]]
        used = sorted(sorted(used, key=lambda t: abs(t - coords[0]))[:MAX_SLICES])
        panels = [(t, keys[t]) for t in used]
        title += f"\n{len(panels)} of {grid[0]} slices along axis 0 (those holding the query or its keys)"
    height, width = grid[-2:]
    side = 3.0 if len(panels) == 1 else 2.0
    fig = _figure(side * len(panels), side * height / width + 0.5)
    for i, (t, cells) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _image(ax, cells.astype(np.float32), aspect="equal")
        if t is None or t == coords[0]:
            ax.plot(coords[-1], coords[-2], "o", color="red", markersize=max(2.0, 60 / max(grid[-2:])))
        if t is not None:
            ax.set_title(f"slice {t}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    return fig


def _pattern(allowed: np.ndarray, title: str, xlabel: str, ylabel: str):
    """A (rows, cols) 0/1 array as an image, averaged into cells when larger than MAX_CELLS per side."""
    cells, factor = _shrink(allowed.astype(np.float32))
    fig = _figure(3.4 + (0.9 if factor > 1 else 0), 3.0 * min(2.0, max(0.5, cells.shape[0] / cells.shape[1])) + 0.6)
    ax = fig.add_subplot()
    # averaged cells are shaded up to the densest one, so a sparse mask stays visible
    image = _image(ax, cells, vmax=1.0 if factor == 1 else max(float(cells.max()), 1e-6), aspect="equal")
    if factor > 1:
        bar = fig.colorbar(image, ax=ax, shrink=0.7)
        bar.set_label("share of pairs allowed", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel + (f" (cells of {factor})" if factor > 1 else ""), fontsize=8)
    ax.set_ylabel(ylabel + (f" (cells of {factor})" if factor > 1 else ""), fontsize=8)
    ax.set_title(title, fontsize=8)
    return fig


def _shrink(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Average ``values`` over factor x factor blocks so no side exceeds MAX_CELLS (edges padded with 0)."""
    factor = -(-max(values.shape) // MAX_CELLS)
    if factor == 1:
        return values, 1
    rows, cols = (-(-n // factor) * factor for n in values.shape)
    padded = np.zeros((rows, cols), np.float32)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded.reshape(rows // factor, factor, cols // factor, factor).mean((1, 3)), factor


def _image(ax, cells: np.ndarray, cmap=ALLOWED_CMAP, vmax=1.0, aspect="auto"):
    image = ax.imshow(cells, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", aspect=aspect)
    ax.tick_params(labelsize=7)
    if max(cells.shape) <= 32:  # thin cell borders where cells are big enough to count
        ax.set_xticks(np.arange(-0.5, cells.shape[1]), minor=True)
        ax.set_yticks(np.arange(-0.5, cells.shape[0]), minor=True)
        ax.grid(which="minor", color="#d9d9d9", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    return image


# ----------------------------------------------------------------------------- tables
def plot_table(table, path=None, title: Optional[str] = None):
    """Draw a :class:`~edgeattn.tables.BlockTable` (tiles x key blocks, see the module doc) or a
    :class:`~edgeattn.tables.DenseTable` (its mask, head 0); returns the Figure, written as PNG to ``path`` when
    given.  The drawn array is ``fig.axes[0].images[0].get_array()``."""
    require_matplotlib("plot_table")
    name = title or table.name
    if isinstance(table, DenseTable):
        heads = table.mask.shape[0]
        fig = _pattern(
            table.mask[0].numpy(),
            f"{name}: dense table, {table.density:.1%} allowed" + (f" (head 0 of {heads})" if heads > 1 else ""),
            "key",
            "query",
        )
    else:
        cells, what = block_image(table)
        tiles, tq = table.q_index.shape
        fig = _figure(4.2, 3.2 * min(2.0, max(0.4, cells.shape[0] / cells.shape[1])) + 1.0)
        ax = fig.add_subplot()
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        _image(ax, cells, ListedColormap(BLOCK_COLORS), vmax=2)
        ax.set_xlabel(f"key block j ({what})", fontsize=8)
        ax.set_ylabel(f"query tile ({tq} queries each)", fontsize=8)
        ax.set_title(
            f"{name}: {tiles} query tiles, each scoring {table.kv_index.shape[1]} keys\ncomputes "
            f"{table.work_fraction:.1%} of the dense scores (padding included)",
            fontsize=8,
        )
        fig.legend(
            handles=[Patch(facecolor=c, edgecolor="grey", label=label) for c, label in zip(BLOCK_COLORS, BLOCK_LABELS)],
            loc="outside lower center",
            ncols=3,
            fontsize=7,
            frameon=False,
        )
    if path is not None:
        _save(fig, path)
    return fig


def block_image(table: BlockTable) -> tuple[np.ndarray, str]:
    """(query tiles, key blocks) uint8 image of a block table and what a key block is: 0 where the tile gathers no
    key of the block (skipped), 1 where it scores keys of the block with some pair masked, 2 where every pair it
    scores there is allowed.  When queries and keys are the same tokens, key block j holds the keys at the
    positions of query tile j (2-D tiles stay 2-D); otherwise runs of as many keys as a tile has queries."""
    tiles, tq = table.q_index.shape
    blocks = table.bank[table.block].numpy()  # (tiles, heads, tq, K)
    used = blocks.any((1, 2))  # padding keys are masked for every query
    full = blocks.all((1, 2))
    kv = table.kv_index.numpy()
    # a bucket of a bucketed table holds some of the queries: its key blocks are runs of keys, as for cross-attention
    if table.shape.q_len == table.shape.kv_len and table.q_pos.numel() == table.shape.q_len:
        column, what, width = table.q_pos.numpy()[kv] // tq, "the keys of query tile j", tiles
    else:
        size = max(tq, -(-table.shape.kv_len // MAX_CELLS))
        column, what, width = kv // size, f"{size} keys each", -(-table.shape.kv_len // size)
    tile = np.broadcast_to(np.arange(tiles)[:, None], column.shape)
    cells = np.zeros((tiles, width), np.uint8)
    cells[tile[used], column[used]] = 2
    partly = used & ~full
    cells[tile[partly], column[partly]] = 1
    return cells, what


def plot_file_tables(path, folder) -> list[str]:
    """``inspect FILE --plot DIR``: one PNG per distinct table stored in the .onnx file ``path`` (read from its
    initializers, :func:`inspection.read_tables`), into ``folder`` (created if needed).  Returns one line per
    picture written and per group of attention nodes that has no table to draw, and why."""
    check_plot(path, folder)
    folder = Path(folder)
    lines = []
    for i, entry in enumerate(inspection.read_tables(path), 1):
        nodes = f"{len(entry['nodes'])} node{'s' if len(entry['nodes']) > 1 else ''}"
        if entry["arrays"] is None:
            lines.append(f"not drawn: {entry['mask']} ({nodes}): {entry['why']}")
            continue
        out = folder / f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', entry['mask'])}-{entry['layout']}.png"
        plot_table(_table(entry), out)
        lines.append(f"wrote {out}: {entry['mask']} {entry['layout']} table ({nodes})")
    return lines


def check_plot(path, folder) -> None:
    """Fail before any work when the tables of ``path`` cannot be drawn into ``folder``: not an .onnx file, a
    folder that is a file, no matplotlib."""
    inspection.check_tables_readable(path)
    if Path(folder).exists() and not Path(folder).is_dir():
        raise BadFile(f"{folder}: is a file; --plot takes a folder to write the pictures into")
    require_matplotlib("--plot")


def _table(entry: dict):
    """A table read from a file -> the DenseTable / BlockTable it was exported from (mask and structure)."""
    arrays = {role: torch.from_numpy(np.array(a)) for role, a in entry["arrays"].items()}
    shape = Shape(entry["q_len"], entry["kv_len"])
    if entry["layout"] == "dense":
        return DenseTable(entry["mask"], shape, arrays["mask"], arrays.get("bias"))
    tile = (arrays["q_index"].shape[1],)
    return BlockTable(
        entry["mask"],
        shape,
        tile,
        arrays["q_index"],
        arrays["kv_index"],
        arrays["q_pos"],
        arrays["block"],
        arrays["bank"],
        arrays.get("bank_bias"),
    )


# ----------------------------------------------------------------------------- bench
def plot_bench(rows, path=None, title: str = "edgeattn bench"):
    """``bench --plot``: one bar per timed row, p50 latency with its value and speedup over eager PyTorch, colored
    by runtime and labelled by lowering (and form and precision where the rows differ in them); eager PyTorch is
    also the dashed line.  Returns the Figure, written as PNG to ``path`` when given."""
    require_matplotlib("--plot")
    timed = [r for r in rows if r.p50_ms is not None]
    if not timed:
        raise EdgeAttnError("no row was timed, so there is no latency to plot")
    order = list(dict.fromkeys(r.runtime for r in timed))
    timed.sort(key=lambda r: order.index(r.runtime))  # stable: each runtime's rows stay in export order
    exported = [r for r in timed if r.lowering != "eager"]
    vary = [f for f in ("form", "precision") if len({getattr(r, f) for r in exported}) > 1]
    labels = [
        f"{r.runtime}: "
        + " ".join([r.lowering] + [getattr(r, f) for f in vary if r.lowering != "eager"])
        + ("" if r.status == "ok" else f" ({r.status})")
        for r in timed
    ]
    palette = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    colors = [palette[order.index(r.runtime) % len(palette)] for r in timed]
    values = [r.p50_ms for r in timed]
    fig = _figure(8, 0.32 * len(timed) + 1.3)
    ax = fig.add_subplot()
    ax.barh(range(len(timed)), values, color=colors, hatch=[None if r.status == "ok" else "//" for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=8)
    ax.invert_yaxis()
    log = max(values) / max(min(values), 1e-9) > 30  # a linear axis reads at a glance unless the range is wide
    if log:
        ax.set_xscale("log")
    for i, r in enumerate(timed):
        speed = f" ({r.speedup:.1f}x)" if r.speedup is not None and r.lowering != "eager" else ""
        ax.text(r.p50_ms, i, f" {r.p50_ms:.2f} ms{speed}", va="center", fontsize=7)
    eager = next((r.p50_ms for r in timed if r.lowering == "eager"), None)
    if eager:
        ax.axvline(eager, color="#7f7f7f", linestyle="--", linewidth=0.8)
    ax.set_xlim(right=max(values) * (4 if log else 1.3))
    ax.set_xlabel("p50 latency per run, ms (lower is better" + (", log scale)" if log else ")"), fontsize=8)
    ax.set_title(title, fontsize=9)
    if path is not None:
        _save(fig, path)
    return fig


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path) -> None:
    """Write ``fig`` as PNG, replacing ``path`` atomically."""
    check_writable(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
