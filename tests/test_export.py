import os
import stat

import onnx
import pytest
import torch

from edgeattn import EdgeAttnError, export_onnx, masks, onnxfile, parity, tables
from edgeattn.layers import MaskedSelfAttention
from edgeattn.onnxfile import DOMAIN, LOWERINGS, TABLE_INPUTS
from edgeattn.runtimes.ort import for_runtime

from conftest import CPU_RUNTIMES, LOWERING_CASES, LOWERING_LIST

# One small one-layer case per mask family: (mask, layer shape kwargs).  Every family must have one.
FAMILY_CASES = {
    "causal": (masks.causal(), dict(seq_len=20)),
    "sliding_window": (masks.sliding_window(4, causal=False), dict(seq_len=20)),
    "sinks": (masks.sinks(2, 5), dict(seq_len=24)),
    "segments": (masks.segments([0] * 5 + [1] * 7 + [2] * 4), dict(seq_len=16)),
    "neighborhood": (masks.neighborhood((3, 4), dilation=(2, 1)), dict(grid=(7, 8))),
    "window": (masks.window(4, shift=2), dict(grid=(8, 8))),
    "manhattan_decay": (masks.manhattan_decay([0.9, 0.6]), dict(grid=(5, 6))),
    "decay_1d": (masks.decay_1d([0.8, 0.5]), dict(seq_len=12)),
    "radial": (masks.radial(4, block_size=4, sink=True, text=3), dict(seq_len=4 * 6 + 3)),
    "clear": (masks.clear(3, text=5, image=(5, 6)), dict(seq_len=5 + 5 * 6)),
}


def test_every_family_has_an_export_case():
    assert set(FAMILY_CASES) == set(masks.FAMILIES)


def test_every_lowering_has_a_case():
    # the routed layout's lowerings read blocks chosen in the graph, not a mask's table: tests/test_routing.py
    assert set(LOWERING_CASES) == {name for name, low in LOWERINGS.items() if low.layout != "routed"}


def _export(tmp_path, layer, x, custom_op, name="m.onnx", **kwargs):
    return export_onnx(
        layer, [x], tmp_path / name, custom_op=custom_op, input_names=["x"], output_names=["y"], **kwargs
    )


def _assert_parity(layer, x, path, runtimes=CPU_RUNTIMES, atol=1e-4):
    results = parity.compare_model(layer, [x], path, runtimes, runs=1)
    for r in results:
        assert r.ok, parity.format_table(results)
        assert r.max_abs_err <= atol


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
@pytest.mark.parametrize("lowering", sorted(LOWERING_CASES))
@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_family_exports_and_matches_torch(tmp_path, family, lowering, custom_op):
    mask, shape = FAMILY_CASES[family]
    opset, targets = LOWERING_CASES[lowering]
    layer = MaskedSelfAttention(32, 2, mask, **shape).eval()
    x = torch.randn(2, layer.seq_len, 32)
    result = _export(tmp_path, layer, x, custom_op, opset=opset, lowering=lowering, runtimes=targets)
    assert [m["lowering"] for m in result.masks] == [lowering]
    model = onnx.load(result.path)
    domains = {n.domain for n in model.graph.node}
    if not custom_op:
        assert DOMAIN not in domains and not model.functions
        assert all(op.domain != DOMAIN for op in model.opset_import)
    else:
        assert DOMAIN in domains
        # masks with a bias_mod (decays, relative position biases) pass it as the last input and use the _bias body
        [node] = [n for n in model.graph.node if n.domain == DOMAIN]
        has_bias = len(node.input) == 3 + len(TABLE_INPUTS[result.masks[0]["layout"]])
        op_type = f"MaskedAttention_{lowering}{'_bias' if has_bias else ''}"  # one function per body, no overloads
        assert node.op_type == op_type and not node.overload
        assert [(f.domain, f.name, f.overload) for f in model.functions] == [(DOMAIN, op_type, "")]
    onnx.checker.check_model(model, full_check=True)
    # every lowering is exact against the dense torch reference
    _assert_parity(layer, x, result.path, [r for r in CPU_RUNTIMES if targets is None or r in targets], atol=1e-5)


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
@pytest.mark.parametrize("lowering,opset,runtimes", LOWERING_LIST, ids=[c[0] for c in LOWERING_LIST])
def test_fully_masked_rows_are_zeros_on_every_runtime(tmp_path, custom_op, lowering, opset, runtimes):
    blocked = masks.custom(lambda b, h, q, kv: (q % 4 != 1) & (kv <= q), name="causal_rows1mod4_blocked")
    layer = MaskedSelfAttention(16, 2, blocked, seq_len=12, proj=False, layout="dense").eval()
    assert layer.table.attn_mask.any(-1).logical_not().sum() == 3
    x = torch.randn(1, 12, 16)
    path = _export(tmp_path, layer, x, custom_op, lowering=lowering, opset=opset, runtimes=runtimes).path
    from edgeattn import load

    runtimes = [r for r in CPU_RUNTIMES if runtimes is None or r in runtimes]
    for name in runtimes:
        y = load(path, name).run({"x": x.numpy()})["y"]
        assert not (y != y).any(), f"NaN on {name}"
        assert (y[0, 1::4] == 0).all(), f"{name} did not return zeros for fully-masked rows"
    _assert_parity(layer, x, path, runtimes)


def test_bias_mod_exports_with_its_own_body(tmp_path):
    alibi = masks.custom(
        lambda b, h, q, kv: kv <= q, bias_mod=lambda b, h, q, kv: -(h + 1) * 0.1 * (q - kv).abs(), name="alibi"
    )
    layer = MaskedSelfAttention(16, 2, alibi, seq_len=10, layout="dense").eval()
    assert layer.table.attn_bias.shape == (2, 10, 10)
    x = torch.randn(1, 10, 16)
    for lowering, opset, runtimes in LOWERING_LIST:
        result = _export(tmp_path, layer, x, custom_op=True, lowering=lowering, opset=opset, runtimes=runtimes)
        assert [f.name for f in onnx.load(result.path).functions] == [f"MaskedAttention_{lowering}_bias"]
        if lowering != "blocked":
            assert result.table_bytes == 10 * 10 + 2 * 10 * 10 * 4
        _assert_parity(layer, x, result.path, [r for r in CPU_RUNTIMES if runtimes is None or r in runtimes])


@pytest.mark.parametrize("lowering", ["dense", "blocked"])
def test_metadata_and_deduplicated_tables(tmp_path, lowering):
    mask = masks.neighborhood(3)
    model = torch.nn.Sequential(
        MaskedSelfAttention(16, 2, mask, grid=(6, 6)), MaskedSelfAttention(16, 2, mask, grid=(6, 6))
    ).eval()
    x = torch.randn(1, 36, 16)
    result = _export(tmp_path, model, x, custom_op=True, lowering=lowering)
    proto = onnx.load(result.path)
    meta = onnxfile.read_metadata(proto)
    assert meta["version"] and meta["opset"] == 18 and meta["inline"] is False
    assert meta["lowering"] == lowering and meta["targets"] == ["ort-cpu", "ort-cuda", "openvino-cpu"]
    assert [(m["mask"], m["lowering"], m["why"]) for m in meta["masks"]] == [
        ("neighborhood_k3", lowering, "requested")
    ] * 2
    one_table = model[0].table.table if lowering == "blocked" else tables.build(mask, grid=(6, 6))
    assert meta["table_bytes"] == result.table_bytes == one_table.nbytes  # both layers share one table
    inputs = [list(n.input) for n in proto.graph.node if n.domain == DOMAIN]
    assert inputs[0][3:] == inputs[1][3:]
    assert model[0].table.layout == "blocked"  # export restored the layers' own layout


def test_auto_records_its_reason_per_layer(tmp_path):
    model = torch.nn.Sequential(
        MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(12, 12)),
        MaskedSelfAttention(16, 2, masks.causal(), seq_len=144),
    ).eval()
    result = _export(tmp_path, model, torch.randn(1, 144, 16), custom_op=True)
    first, second = onnxfile.read_metadata(onnx.load(result.path))["masks"]
    assert first["lowering"] == "blocked" and "block table scores" in first["why"]
    assert second["lowering"] == "dense" and "block table would score" in second["why"]
    result = _export(tmp_path, model, torch.randn(1, 144, 16), custom_op=True, opset=23)
    assert [m["lowering"] for m in result.masks] == ["blocked", "attention"]


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
@pytest.mark.parametrize("opset", [18, 23])
def test_bucketed_tables_export_one_node_per_bucket(tmp_path, custom_op, opset):
    prefix_lm = masks.causal() | masks.custom(lambda b, h, q, kv: kv < 200, name="prefix200")
    doc = torch.tensor([0] * 300 + [1] * 500 + [2] * 224)
    document = masks.custom(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q), name="document")
    model = torch.nn.Sequential(*(MaskedSelfAttention(16, 2, m, seq_len=1024) for m in (prefix_lm, document))).eval()
    splits = [layer.table.table for layer in model]
    x = torch.randn(1, 1024, 16)
    result = _export(tmp_path, model, x, custom_op, opset=opset)
    dense = "attention" if opset >= 23 else "dense"
    assert [m["lowering"] for m in result.masks] == [
        dense if isinstance(b, tables.DenseBucket) else "blocked" for split in splits for b in split.buckets
    ]
    assert all(
        f"{len(split.buckets)} buckets" in m["why"]
        for split, m in zip([s for s in splits for _ in s.buckets], result.masks)
    )
    assert {"blocked", dense} == {m["lowering"] for m in result.masks}
    _assert_parity(model, x, result.path, atol=1e-5)


@pytest.mark.parametrize("seq_len, gathers", [(1024, 0), (1100, 1)])
def test_causal_buckets_slice_their_rows_and_keys(tmp_path, seq_len, gathers):
    # a causal bucket's queries are a run of rows and its keys a prefix: Slices, and the rows come back in order
    # without a Gather; only a padded last tile (rows 1088..1099, then 1099 again) still needs one
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=seq_len).eval()
    assert isinstance(layer.table.table, tables.BucketedTable)
    x = torch.randn(2, seq_len, 16)
    result = _export(tmp_path, layer, x, custom_op=False)
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    assert ops.count("Gather") == gathers and ops.count("Slice") >= 2 * len(layer.table.table.buckets)
    _assert_parity(layer, x, result.path, atol=1e-5)


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom-op", "standard"])
def test_chunked_tables_export_one_blocked_node_per_chunk(tmp_path, custom_op):
    mask = masks.custom(
        lambda b, h, q, kv: (kv <= q) & (q - kv < 90),
        bias_mod=lambda b, h, q, kv: (kv - q) / 50.0,
        name="sliding90_decay",
    )
    layer = MaskedSelfAttention(16, 2, mask, seq_len=700, layout="blocked").eval()
    layer.table.use_layout("bucketed", tables.chunked(layer.table.table, 3))
    x = torch.randn(2, 700, 16)
    result = _export(tmp_path, layer, x, custom_op)
    assert [m["lowering"] for m in result.masks] == ["blocked"] * 4  # 11 tiles of 64 queries
    assert "4 buckets of query tiles by position, 3 tiles each" in result.masks[0]["why"]
    _assert_parity(layer, x, result.path, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lowering="attention"), "needs opset >= 23"),
        (dict(lowering="contrib"), "runs on ort-cpu, ort-cuda only, not on openvino-cpu"),
        (dict(lowering="sparse"), "unknown lowering 'sparse'"),
        (dict(runtimes=["tensorrt"]), "target runtimes must be among"),
    ],
)
def test_bad_lowering_requests_are_clear_errors(tmp_path, kwargs, message):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=4)
    with pytest.raises(EdgeAttnError, match=message):
        _export(tmp_path, layer, torch.randn(1, 4, 16), custom_op=True, **kwargs)
    assert not list(tmp_path.iterdir())


def test_opset_17_exports_and_runs(tmp_path):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=8).eval()
    x = torch.randn(1, 8, 16)
    result = export_onnx(layer, [x], tmp_path / "m.onnx", opset=17, input_names=["x"])
    assert {op.domain: op.version for op in onnx.load(result.path).opset_import}[""] == 17
    _assert_parity(layer, x, result.path)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x + 1
        return x - 1


def test_failed_export_leaves_previous_file_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(EdgeAttnError, match="export failed"):
        export_onnx(_DataDependent(), [torch.randn(3)], target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_bad_opset_is_rejected(tmp_path):
    with pytest.raises(EdgeAttnError, match="opset"):
        export_onnx(torch.nn.Identity(), [torch.randn(2)], tmp_path / "m.onnx", opset=11)


def test_written_files_get_normal_permissions(tmp_path):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=4).eval()
    umask = os.umask(0o022)
    try:
        path = _export(tmp_path, layer, torch.randn(1, 4, 16), custom_op=True).path
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    _export(tmp_path, layer, torch.randn(1, 4, 16), custom_op=False)  # replacing keeps the old mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "target, message",
    [
        (".", "is a directory"),
        ("afile/m.onnx", "afile is a file"),
        ("", "output path is empty"),
    ],
)
def test_bad_output_paths_fail_before_exporting(tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EdgeAttnError, match=message):
        export_onnx(torch.nn.Identity(), [torch.randn(2)], target)


def test_export_restores_training_mode_and_takes_a_single_tensor(tmp_path):
    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=4).train()
    export_onnx(layer, torch.randn(1, 4, 16), tmp_path / "m.onnx")
    assert layer.training


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(EdgeAttnError, match=r"may not set \['masks'\]"):
        export_onnx(torch.nn.Identity(), [torch.randn(2)], tmp_path / "m.onnx", metadata_props={"masks": 1})


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MaskedSelfAttention(16, 2, masks.sliding_window(2), seq_len=6)

    def forward(self, x):
        y = self.attn(x)
        return {"y": y, "stats": (y.mean(-1), y.amax(-1))}


def test_parity_flattens_nested_outputs(tmp_path):
    model, x = _TwoOutputs().eval(), torch.randn(1, 6, 16)
    path = export_onnx(model, [x], tmp_path / "m.onnx").path
    assert len(onnx.load(path).graph.output) == 3
    _assert_parity(model, x, path)


def test_auto_dense_nodes_run_their_fastest_way_per_runtime(tmp_path):
    from edgeattn import runtimes

    layer = MaskedSelfAttention(16, 2, masks.causal(), seq_len=64).eval()
    x = torch.randn(1, 64, 16)
    result = _export(tmp_path, layer, x, custom_op=True)
    (node,) = result.masks
    assert node["lowering"] == "dense"
    assert node["runs_as"] == {"ort-cpu": "contrib", "openvino-cpu": "sdpa"}
    swapped = for_runtime(onnx.load(result.path), runtimes.get("ort-cpu"))
    assert [n.op_type for n in swapped.graph.node if n.domain == DOMAIN] == ["MaskedAttention_contrib"]
    onnx.checker.check_model(swapped, full_check=True)
    assert "contrib" not in str(for_runtime(onnx.load(result.path), runtimes.get("ort-cuda")).graph.node)
    _assert_parity(layer, x, result.path, atol=1e-5)
    # an explicitly requested lowering is what onnxruntime runs
    explicit = _export(tmp_path, layer, x, custom_op=True, lowering="dense", name="d.onnx")
    assert explicit.masks[0]["runs_as"] == {"openvino-cpu": "sdpa"}
    assert "contrib" not in str(for_runtime(onnx.load(explicit.path), runtimes.get("ort-cpu")).graph.node)


@pytest.mark.parametrize("lowering,opset,runtimes", LOWERING_LIST, ids=[c[0] for c in LOWERING_LIST])
def test_dynamic_batch_runs_at_1_3_and_8(tmp_path, lowering, opset, runtimes):
    from edgeattn import load

    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    result = _export(
        tmp_path,
        layer,
        torch.randn(1, 36, 16),
        custom_op=True,
        lowering=lowering,
        opset=opset,
        runtimes=runtimes,
        dynamic_batch=True,
    )
    assert onnxfile.read_metadata(onnx.load(result.path))["dynamic_batch"] is True
    for name in [r for r in CPU_RUNTIMES if runtimes is None or r in runtimes]:
        session = load(result.path, name)
        assert session.inputs[0].shape == ("batch", 36, 16)
        for batch in (1, 3, 8):
            x = torch.randn(batch, 36, 16)
            with torch.no_grad():
                want = layer(x).numpy()
            got = session.run({"x": x.numpy()})["y"]
            assert got.shape == want.shape and abs(got - want).max() < 1e-5, (name, batch)


def test_files_carry_no_exporter_stack_traces(tmp_path):
    """torch.onnx writes each node's Python stack trace (source paths of this machine); export keeps only the
    module namespace."""
    layer = MaskedSelfAttention(16, 2, masks.neighborhood(3), grid=(6, 6)).eval()
    result = _export(tmp_path, layer, torch.randn(1, 36, 16), custom_op=True)
    data = result.path.read_bytes()
    assert b"pkg.torch" not in data and b"stack_trace" not in data and __file__.encode() not in data
    keys = {p.key for n in onnx.load(result.path).graph.node for p in n.metadata_props}
    assert keys == {"namespace"}
