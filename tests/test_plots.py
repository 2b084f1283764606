"""Pictures: the arrays drawn are the masks and tables themselves, the files are real PNGs, errors are one line."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

import edgeattn
from edgeattn import inspection, masks, plots, tables
from edgeattn.attention import masked_attention
from edgeattn.bench import BenchRow
from edgeattn.cli import main
from edgeattn.errors import EdgeAttnError
from edgeattn.layers import MaskedSelfAttention

pytest.importorskip("matplotlib")
from matplotlib.image import imread


def drawn(fig, panel=0):
    return np.asarray(fig.axes[panel].images[0].get_array())


def read_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and 100 <= image.shape[0] <= 1200 and 100 <= image.shape[1] <= 1200
    return image


@pytest.mark.parametrize(
    "mask, q_len, kv_len", [(masks.sliding_window(3), 16, None), (masks.causal(), 6, 10), (masks.sinks(2, 3), 12, None)]
)
def test_sequence_pattern_is_materialize(tmp_path, mask, q_len, kv_len):
    fig = edgeattn.plot_mask(mask, q_len=q_len, kv_len=kv_len, path=tmp_path / "m.png")
    want = edgeattn.materialize(mask, q_len=q_len, kv_len=kv_len)[0].numpy()
    assert np.array_equal(drawn(fig), want)
    read_png(tmp_path / "m.png")


@pytest.mark.parametrize(
    "mask, grid, query, coords",
    [
        (masks.neighborhood(5, dilation=2), (14, 14), None, (1, 1)),  # default: one in from the corner
        (masks.neighborhood(3), (9, 11), 0, (0, 0)),
        (masks.window(4, shift=2), (8, 8), (7, 6), (7, 6)),
        (masks.clear(3), (12, 12), 6 * 12 + 6, (6, 6)),
    ],
)
def test_grid_query_view_is_the_querys_row_of_materialize(mask, grid, query, coords):
    fig = edgeattn.plot_mask(mask, grid=grid, query=query)
    flat = int(np.ravel_multi_index(coords, grid))
    want = edgeattn.materialize(mask, grid=grid)[0, flat].reshape(grid).numpy()
    assert np.array_equal(drawn(fig), want) and str(coords) in fig._suptitle.get_text()


def test_3d_grid_draws_the_slices_holding_the_query_or_its_keys():
    mask, grid, coords = masks.neighborhood(3), (6, 5, 5), (0, 2, 2)
    fig = edgeattn.plot_mask(mask, grid=grid, query=coords)
    want = edgeattn.materialize(mask, grid=grid)[0, int(np.ravel_multi_index(coords, grid))].reshape(grid).numpy()
    # kernel 3 at the border shifts: slices 0, 1, 2 hold the keys
    assert len(fig.axes) == 3 and all(np.array_equal(drawn(fig, t), want[t]) for t in range(3))


def test_a_bare_mask_mod_and_a_big_pattern():
    def every_other(b, h, q_idx, kv_idx):
        return (q_idx + kv_idx) % 2 == 0

    fig = edgeattn.plot_mask(every_other, q_len=5, kv_len=7)
    assert np.array_equal(drawn(fig), edgeattn.materialize(every_other, q_len=5, kv_len=7)[0].numpy())
    # over MAX_CELLS per side: each cell is the share of allowed pairs of a 2x2 block
    fig = edgeattn.plot_mask(masks.causal(), q_len=2 * plots.MAX_CELLS)
    cells = drawn(fig)
    assert cells.shape == (plots.MAX_CELLS, plots.MAX_CELLS)
    assert cells[0, 0] == 0.75 and cells[0, 1] == 0 and cells[1, 0] == 1


def test_blocked_table_picture_matches_the_table(tmp_path):
    table = tables.build(masks.neighborhood(3), grid=(12, 12), layout="blocked")
    fig = plots.plot_table(table, tmp_path / "t.png")
    cells = drawn(fig)
    tiles = table.q_index.shape[0]
    tile_of = {int(q): t for t in range(tiles) for q in table.q_index[t]}  # key block j: the keys of query tile j
    expected = set()
    for t in range(tiles):
        keys = table.kv_index[t][table.bank[table.block[t]].any(0).any(0)]  # padding keys are masked everywhere
        expected |= {(t, tile_of[int(k)]) for k in keys}
    assert {tuple(c) for c in np.argwhere(cells > 0)} == expected and cells.shape == (tiles, tiles)
    assert f"{table.work_fraction:.1%}" in fig.axes[0].get_title()
    read_png(tmp_path / "t.png")
    # Swin windows: one tile per window, which gathers exactly its own window's keys, all allowed
    windows = tables.build(masks.window(4), grid=(8, 8), layout="blocked")
    assert bool(windows.full.all()) and np.array_equal(drawn(plots.plot_table(windows)), 2 * np.eye(4))
    # queries the tail of the keys: key blocks are runs of 64 keys, the last one is where causality masks
    tail = tables.build(masks.causal(), q_len=64, kv_len=256, layout="blocked")
    assert drawn(plots.plot_table(tail)).tolist() == [[2, 2, 2, 1]]
    # a bucket of a bucketed table holds some queries only: its key blocks are runs of 64 keys too
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 500, 224]))
    split = tables.build(masks.custom(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q)), q_len=1024, layout="auto")
    bucket = next(b for b in split.buckets if isinstance(b, tables.BlockTable))
    cells = drawn(plots.plot_table(bucket))
    assert cells.shape == (bucket.q_index.shape[0], 16) and (cells > 0).any(1).all()


def test_dense_table_picture_is_its_mask():
    table = tables.build(masks.sliding_window(2), q_len=10, layout="dense")
    assert np.array_equal(drawn(plots.plot_table(table)), table.mask[0].numpy())


class Mixed(nn.Module):
    """Two layers sharing one block table, a dense-table layer and attention over a mask computed in the graph."""

    def __init__(self):
        super().__init__()
        self.a = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(12, 12))
        self.b = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(12, 12))
        self.c = MaskedSelfAttention(16, 2, masks.causal(), seq_len=144)
        self.logits = nn.Linear(16, 1)

    def forward(self, x):
        x = self.c(self.b(self.a(x)))
        h = x.reshape(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        computed = (self.logits(x).squeeze(-1) > 0)[:, None, None, :]
        return masked_attention(h, h, h, computed).transpose(1, 2).reshape(x.shape)


@pytest.fixture(scope="module", params=[False, True], ids=["standard", "custom-op"])
def mixed_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "mixed.onnx"
    edgeattn.export_onnx(Mixed().eval(), [torch.randn(1, 144, 16)], path, custom_op=request.param)
    return path


def test_inspect_plot_draws_each_table_read_from_the_file(capsys, tmp_path, mixed_file):
    code = main(["inspect", str(mixed_file), "--plot", str(tmp_path / "pictures")])
    out, err = capsys.readouterr()
    assert code == 0, err
    written = sorted((tmp_path / "pictures").iterdir())
    assert [p.name for p in written] == ["01-neighborhood_k3-blocked.png", "02-causal-dense.png"]
    assert "(2 nodes)" in out and "not drawn: <computed in the graph> (1 node): mask computed in the graph" in out
    for p in written:
        read_png(p)
    # the pictures are of the tables in the file: the same as those the layers built
    entries = inspection.read_tables(mixed_file)
    blocked, dense = (plots._table(e) for e in entries[:2])
    want = tables.build(masks.neighborhood(3), grid=(12, 12), layout="blocked")
    assert np.array_equal(plots.block_image(blocked)[0], plots.block_image(want)[0])
    assert blocked.work_fraction == want.work_fraction
    assert torch.equal(dense.mask[0], edgeattn.materialize(masks.causal(), q_len=144)[0])


def test_bench_chart_groups_runtimes_and_labels_what_differs(tmp_path):
    rows = [
        BenchRow("torch", "eager", "ok", "-", p50_ms=10.0, speedup=1.0),
        BenchRow("ort-cpu", "dense", "ok", "standard", p50_ms=5.0, speedup=2.0),
        BenchRow("openvino-cpu", "dense", "ok", "standard", p50_ms=4.0, speedup=2.5),
        BenchRow("ort-cpu", "blocked", "fail", "custom-op", p50_ms=2.0, speedup=5.0),
        BenchRow("openvino-cpu", "contrib", "n/a", "standard"),
    ]
    fig = plots.plot_bench(rows, tmp_path / "b.png", title="t")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [
        "torch: eager",
        "ort-cpu: dense standard",
        "ort-cpu: blocked custom-op (fail)",
        "openvino-cpu: dense standard",
    ]
    assert [p.get_width() for p in fig.axes[0].patches] == [10.0, 5.0, 2.0, 4.0]
    read_png(tmp_path / "b.png")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_masks_show_writes_the_picture_and_masks_still_lists(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "masks")
    assert code == 0 and out.startswith("causal")
    out_png = tmp_path / "n.png"
    code, out, err = run_cli(
        capsys,
        "masks",
        "show",
        "neighborhood",
        "--param",
        "kernel=5",
        "--param",
        "dilation=2",
        "--grid",
        "12x12",
        "--query",
        "3,5",
        "-o",
        out_png,
    )
    assert code == 0 and out == f"wrote {out_png}\n", err
    read_png(out_png)
    code, out, _ = run_cli(
        capsys,
        "masks",
        "show",
        "sliding_window",
        "--param",
        "window=3",
        "--param",
        "causal=false",
        "--len",
        "20",
        "-o",
        tmp_path / "s.png",
    )
    assert code == 0 and (tmp_path / "s.png").is_file()


# bad `masks show` and --plot command lines, and a part of each one-line message (test_error_family.py runs them too)
BAD_ARGUMENTS = [
    (["masks", "show", "nope", "--len", "8"], "unknown mask family 'nope'; choose from: causal"),
    (
        ["masks", "show", "neighborhood", "--param", "kernal=3", "--grid", "8x8"],
        "neighborhood takes kernel, dilation=1, stride=1, causal=False, rpb=False",
    ),
    (["masks", "show", "neighborhood", "--param", "kernel=x", "--grid", "8x8"], "kernel: cannot read"),
    (["masks", "show", "neighborhood", "--param", "kernel=9", "--grid", "8x8"], "kernel*dilation must be <="),
    (["masks", "show", "window", "--param", "size=4"], "give a token grid (--grid HxW"),
    (["masks", "show", "causal", "--len", "8", "--grid", "8"], "one of the two"),
    (["masks", "show", "window", "--param", "size=4", "--grid", "8xy"], "grid '8xy': cannot read 'y'"),
    (
        ["masks", "show", "neighborhood", "--param", "kernel=3", "--grid", "8x8", "--query", "8,0"],
        "query (8, 0) is not a token of the 8x8 grid",
    ),
    (["masks", "show", "causal", "--len", "8", "--query", "3"], "a sequence mask is drawn whole"),
    (["masks", "show", "causal", "--len", "8", "-o", "README.md/m.png"], "README.md is a file"),
    (["inspect", "README.md", "--plot", "README.md"], "README.md: is a file; --plot takes a folder"),
    (["inspect", "model.xml", "--plot", "pictures"], "model.xml: tables are read from .onnx files"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_without_matplotlib_one_line_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        EdgeAttnError,
        match=r"^plot_mask needs matplotlib; install it with: pip install "
        r"'edgeattn\[plot\]'$",
    ):
        edgeattn.plot_mask(masks.causal(), q_len=4)
    code, out, err = run_cli(capsys, "masks", "show", "causal", "--len", "4")
    assert code == 2 and err == (
        "edgeattn: error: masks show needs matplotlib; install it with: pip install 'edgeattn[plot]'\n"
    )
