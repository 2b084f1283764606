"""One error family: every refusal of the existing bad-input corpus (bad files, feeds, masks, command lines) is an
EdgeAttnError (the subclass saying what went wrong where that is plain) with a one-line message; the command line
prints that line alone and exits 2.

The corpus is the other modules' own: bad files from test_untrusted, feeds and command lines from test_cli, masks
from test_masks and test_fuzz_mask_functions, `masks show` and --plot command lines from test_plots."""

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import BAD_ARGUMENTS, BAD_BENCH_ARGUMENTS, BAD_FEEDS, py_file, write_feeds  # noqa: F401 (a fixture)
from test_fuzz_mask_functions import HEADS, as_mask_mod, mask_functions
from test_masks import BAD_PARAMETERS, BAD_SHAPES, BAD_TABLE_SHAPES, causal_with_if, causal_with_item
from test_plots import BAD_ARGUMENTS as BAD_PLOT_ARGUMENTS
from test_untrusted import bad_files, good  # noqa: F401 (a fixture)

import edgeattn
from edgeattn import errors, runtimes, tables
from edgeattn.cli import _parser, main
from edgeattn.errors import BadFile, EdgeAttnError, InvalidArgument, RuntimeUnavailable
from edgeattn.inspection import inspect_file
from edgeattn.layers import MaskedSelfAttention
from edgeattn.masks import custom, materialize

from conftest import CPU_RUNTIMES

ROOT = Path(__file__).resolve().parents[1]  # test_cli's command lines name README.md and write nothing
FAMILY = [
    errors.EdgeAttnError,
    errors.InvalidArgument,
    errors.BadFile,
    errors.RuntimeUnavailable,
    errors.ExportFailed,
    errors.NoSuchLowering,
]
# the subclass of the command-line refusals (by their corpus message) raised where edgeattn says which; the rest
# are at least EdgeAttnErrors
KIND = {
    **dict.fromkeys(
        [
            "missing.onnx: no such file",
            "README.md: not an ONNX model",
            "is a directory",
            "no such file",
            "inspect reads .onnx and .xml",
            "README.md is a file",
            "README.md: is a file; --plot takes a folder",
            "model.xml: tables are read from .onnx files",
        ],
        BadFile,
    ),
    **dict.fromkeys(
        ["add --check", "neither a registered model", *(m for _, m in BAD_PLOT_ARGUMENTS[:9])], InvalidArgument
    ),
}


def refused(action, kind=EdgeAttnError) -> str:
    """The one-line message of the ``kind`` error ``action()`` raises."""
    with pytest.raises(EdgeAttnError) as info:
        action()
    message = str(info.value)
    assert isinstance(info.value, kind), f"{type(info.value).__name__} is not a {kind.__name__}: {message}"
    assert message.strip() and "\n" not in message, message
    return message


def test_every_class_is_an_edgeattn_error_and_argument_errors_stay_value_errors():
    assert all(issubclass(cls, EdgeAttnError) for cls in FAMILY)
    assert issubclass(errors.InvalidArgument, ValueError) and issubclass(errors.NoSuchLowering, ValueError)
    assert not any(
        issubclass(cls, ValueError) for cls in (errors.BadFile, errors.RuntimeUnavailable, errors.ExportFailed)
    )
    assert all(cls.__name__ in edgeattn.__all__ and getattr(edgeattn, cls.__name__) is cls for cls in FAMILY)
    assert all(cls.__doc__ for cls in FAMILY)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mask, shape, match", BAD_SHAPES)
def test_bad_mask_shapes(mask, shape, match):
    assert match in refused(lambda: materialize(mask(), **shape), InvalidArgument)
    assert match in refused(lambda: tables.build(mask(), **shape), InvalidArgument)


@pytest.mark.parametrize("factory, match", BAD_PARAMETERS)
def test_bad_mask_parameters(factory, match):
    assert match in refused(factory, InvalidArgument)


@pytest.mark.parametrize("shape, match", BAD_TABLE_SHAPES)
def test_bad_table_shapes(shape, match):
    assert match in refused(lambda: tables.build(edgeattn.masks.causal(), **shape), InvalidArgument)


@pytest.mark.parametrize("fn", [causal_with_if, causal_with_item])
def test_mask_functions_written_per_pair(fn):
    assert "cannot be evaluated on index tensors" in refused(lambda: tables.build(fn, q_len=8), InvalidArgument)
    bias = custom(bias_mod=lambda b, h, q, kv: fn(b, h, q, kv).float(), name=fn.__name__)
    assert "cannot be evaluated" in refused(lambda: tables.build(bias, q_len=8), InvalidArgument)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mask_functions_that_use_the_batch_index(data):
    length = data.draw(st.integers(2, 8))
    expr = data.draw(mask_functions(length, batch=True).filter(lambda e: e.uses_batch))
    assert "depends on the batch index b" in refused(
        lambda: tables.build(as_mask_mod(expr), length, heads=HEADS), InvalidArgument
    )
    assert "depends on the batch index b" in refused(
        lambda: MaskedSelfAttention(HEADS * 4, HEADS, as_mask_mod(expr), seq_len=length), InvalidArgument
    )


# ----------------------------------------------------------------------------- files
def test_bad_files(good, tmp_path):  # noqa: F811 (the fixture imported above)
    """Each bad file in each CPU runtime and inspect: a BadFile where test_untrusted expects a message; a flipped
    byte may leave a loadable model, or fail later (any EdgeAttnError)."""
    for label, path, message in bad_files(good, tmp_path):
        for attempt in [lambda r=r: edgeattn.load(path, r) for r in CPU_RUNTIMES] + [lambda: inspect_file(path)]:
            if message is not None:
                assert message in refused(attempt, BadFile), label
                continue
            try:
                attempt()
            except EdgeAttnError as e:
                assert "\n" not in str(e), (label, str(e))


# ----------------------------------------------------------------------------- feeds
@pytest.mark.parametrize("arrays, message", [case for case in BAD_FEEDS if case[0] is not None])
def test_bad_feeds_in_every_runtime(py_file, arrays, message):  # noqa: F811 (the fixture imported above)
    for name in CPU_RUNTIMES:
        session = runtimes.load(py_file, name)
        assert message in refused(lambda: session.run(arrays), InvalidArgument), name


def test_an_unavailable_runtime(py_file):  # noqa: F811 (the fixture imported above)
    runtime = runtimes.get("ort-cuda")
    if runtime.is_available():
        pytest.skip("CUDA EP available here")
    assert "runtime ort-cuda is not available" in refused(lambda: runtime.load(py_file), RuntimeUnavailable)


# ----------------------------------------------------------------------------- command lines
def cli_refuses(capsys, argv, message):
    """``argv`` exits 2 with one line on stderr (no traceback), and the command raised that line as an
    EdgeAttnError of the kind KIND names."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("edgeattn: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    args = _parser().parse_args(argv)
    kind = KIND.get(message, EdgeAttnError)
    assert refused(lambda: args.func(args), kind) == err[len("edgeattn: error: ") : -1]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS + BAD_BENCH_ARGUMENTS + BAD_PLOT_ARGUMENTS)
def test_bad_command_lines(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    cli_refuses(capsys, argv, message)


@pytest.mark.parametrize("arrays, message", BAD_FEEDS)
def test_bad_inputs_on_the_command_line(capsys, py_file, tmp_path, arrays, message):  # noqa: F811 (a fixture)
    cli_refuses(capsys, ["check", str(py_file), "--inputs", str(write_feeds(tmp_path / "in.npz", arrays))], message)


def test_a_missing_optional_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "needs matplotlib" in refused(
        lambda: edgeattn.plot_mask(edgeattn.masks.causal(), q_len=4), RuntimeUnavailable
    )
    cli_refuses(capsys, ["masks", "show", "causal", "--len", "4"], "masks show needs matplotlib")
