"""Write the README's pictures into docs/: python docs/make_pictures.py (needs matplotlib: pip install -e ".[plot]").

The first two are what `edgeattn masks show` draws, the third what `edgeattn inspect FILE --plot DIR` draws for a
block table (built here directly instead of read from an exported file)."""

from pathlib import Path

from edgeattn import masks, plot_mask, plots, tables

DOCS = Path(__file__).resolve().parent

# the default query, one in from the corner: the window shifts inward and dilation keeps every other token
plot_mask(masks.neighborhood(7, dilation=2), grid=(24, 24), path=DOCS / "neighborhood_k7_d2.png")
# a query in the corner Swin's roll glued together: it keeps its own region of the shifted window
plot_mask(masks.window(7, shift=3), grid=(14, 14), query=(12, 1), path=DOCS / "swin_shifted.png")
# NAT's 7x7 neighborhood on a 56x56 grid as a block table: 7x7 query tiles and the key tiles each one gathers
plots.plot_table(tables.build(masks.neighborhood(7), grid=(56, 56), layout="blocked"), DOCS / "blocked_table.png")
