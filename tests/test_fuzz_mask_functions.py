"""Property tests for user mask functions: hypothesis builds random mask_mods over (b, h, q_idx, kv_idx) from
comparisons, modular patterns and lookups in captured tensors (head-dependent ones included), joined with &, | and ~.
Each is evaluated two ways: as tensor code (what edgeattn tabulates) and pair by pair on Python ints (the brute
force).  Tables in both layouts and attention in eager and on every CPU runtime must match the brute force; a
function that uses the batch index must be refused with one clear error, since a static table cannot honour it.

CI runs a modest number of examples; EDGEATTN_FUZZ_EXAMPLES raises it (the runtime test runs a quarter of them)."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edgeattn import export_onnx, runtimes, tables
from edgeattn.layers import MaskedSelfAttention, MaskTable

from conftest import CPU_RUNTIMES

EXAMPLES = int(os.environ.get("EDGEATTN_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_RUNTIMES = settings(
    max_examples=max(4, EXAMPLES // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HEADS = 3


class Expr:
    """A boolean expression over the indices with two evaluations: ``tensor(b, h, q, kv)`` broadcasts over index
    tensors, ``scalar(b, h, q, kv)`` takes one pair as Python ints."""

    def __init__(self, text, tensor, scalar, uses_batch=False):
        self.text, self.tensor, self.scalar, self.uses_batch = text, tensor, scalar, uses_batch

    def __repr__(self):
        return self.text


@st.composite
def linear(draw):
    """a*q + c*kv + e*h + f compared with 0."""
    a, c, e = (draw(st.integers(-2, 2)) for _ in range(3))
    f = draw(st.integers(-6, 6))
    op = draw(st.sampled_from(["<", "<=", "==", ">=", ">"]))
    cmp = {
        "<": lambda x: x < 0,
        "<=": lambda x: x <= 0,
        "==": lambda x: x == 0,
        ">=": lambda x: x >= 0,
        ">": lambda x: x > 0,
    }[op]
    return Expr(
        f"({a}q{c:+d}kv{e:+d}h{f:+d} {op} 0)",
        lambda b, h, q, kv: cmp(a * q + c * kv + e * h + f),
        lambda b, h, q, kv: cmp(a * q + c * kv + e * h + f),
    )


@st.composite
def modular(draw):
    m = draw(st.integers(2, 5))
    r = draw(st.integers(0, m - 1))
    with_head = draw(st.booleans())
    return Expr(
        f"((q-kv{'+h' if with_head else ''}) % {m} == {r})",
        lambda b, h, q, kv: (q - kv + (h if with_head else 0)) % m == r,
        lambda b, h, q, kv: (q - kv + (h if with_head else 0)) % m == r,
    )


@st.composite
def lookup(draw, length):
    """Same segment (ids captured from the enclosing scope) or a per-head band |q - kv| <= width[h]."""
    if draw(st.booleans()):
        ids = torch.tensor(sorted(draw(st.lists(st.integers(0, 3), min_size=length, max_size=length))))
        return Expr(
            f"(ids{ids.tolist()}[q] == ids[kv])",
            lambda b, h, q, kv: ids[q] == ids[kv],
            lambda b, h, q, kv: bool(ids[q] == ids[kv]),
        )
    width = torch.tensor(draw(st.lists(st.integers(0, 4), min_size=HEADS, max_size=HEADS)))
    return Expr(
        f"(|q-kv| <= width{width.tolist()}[h])",
        lambda b, h, q, kv: (q - kv).abs() <= width[h],
        lambda b, h, q, kv: abs(q - kv) <= int(width[h]),
    )


@st.composite
def batch_dependent(draw, length):
    """Per-sequence document ids (FlexAttention's document masking) or an arithmetic use of b."""
    if draw(st.booleans()):
        docs = torch.tensor(
            [sorted(draw(st.lists(st.integers(0, 2), min_size=length, max_size=length))) for _ in range(2)]
        )
        return Expr("(docs[b, q] == docs[b, kv])", lambda b, h, q, kv: docs[b, q] == docs[b, kv], None, True)
    return Expr("(q + b >= kv)", lambda b, h, q, kv: q + b >= kv, None, True)


def combine(children):
    def join(parts):
        op, left, right = parts
        if op == "~":
            return Expr(f"~{left}", lambda *i: ~left.tensor(*i), lambda *i: not left.scalar(*i), left.uses_batch)
        both = left.uses_batch or right.uses_batch
        if op == "&":
            return Expr(
                f"({left} & {right})",
                lambda *i: left.tensor(*i) & right.tensor(*i),
                lambda *i: left.scalar(*i) and right.scalar(*i),
                both,
            )
        return Expr(
            f"({left} | {right})",
            lambda *i: left.tensor(*i) | right.tensor(*i),
            lambda *i: left.scalar(*i) or right.scalar(*i),
            both,
        )

    return st.tuples(st.sampled_from(["&", "|", "~"]), children, children).map(join)


def mask_functions(length, batch=False):
    atoms = st.one_of(linear(), modular(), lookup(length))
    if batch:
        atoms = st.one_of(atoms, batch_dependent(length))
    return st.recursive(atoms, combine, max_leaves=5)


def as_mask_mod(expr):
    def mask_mod(b, h, q_idx, kv_idx):
        return expr.tensor(b, h, q_idx, kv_idx)

    return mask_mod


def brute_force(expr, q_len, kv_len, heads=HEADS):
    return torch.tensor(
        [[[bool(expr.scalar(0, h, q, kv)) for kv in range(kv_len)] for q in range(q_len)] for h in range(heads)]
    )


@FUZZ
@given(st.data())
def test_tables_of_generated_mask_functions_match_brute_force(data):
    q_len, kv_len = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    expr = data.draw(mask_functions(max(q_len, kv_len)))
    want = brute_force(expr, q_len, kv_len)
    dense = tables.build(as_mask_mod(expr), q_len, kv_len, heads=HEADS)
    assert torch.equal(dense.mask.expand(HEADS, -1, -1), want), expr
    blocked = tables.build(
        as_mask_mod(expr), q_len, kv_len, heads=HEADS, layout="blocked", tile=data.draw(st.integers(1, 5))
    )
    assert torch.equal(blocked.to_dense().mask.expand(HEADS, -1, -1), want), expr


@FUZZ
@given(st.data())
def test_mask_functions_that_use_the_batch_index_are_refused(data):
    length = data.draw(st.integers(2, 10))
    expr = data.draw(mask_functions(length, batch=True).filter(lambda e: e.uses_batch))
    for layout in ("dense", "blocked"):
        with pytest.raises(ValueError, match="depends on the batch index b.*edgeattn.masked_attention"):
            tables.build(as_mask_mod(expr), length, heads=HEADS, layout=layout)
    with pytest.raises(ValueError, match="depends on the batch index b"):
        MaskedSelfAttention(HEADS * 4, HEADS, as_mask_mod(expr), seq_len=length)


def reference_attention(q, k, v, allowed):
    """softmax over the allowed keys, written out; rows without an allowed key give zeros."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.where(allowed.any(-1, keepdim=True), scores.nan_to_num(0.0) @ v, 0.0)


class Attention(nn.Module):
    def __init__(self, mask_mod, q_len, kv_len, layout):
        super().__init__()
        self.table = MaskTable(mask_mod, HEADS, q_len=q_len, kv_len=kv_len, layout=layout)

    def forward(self, q, k, v):
        return self.table(q, k, v)


@FUZZ_RUNTIMES
@given(st.data())
def test_attention_with_generated_mask_functions_matches_brute_force_in_eager_and_on_runtimes(tmp_path, data):
    q_len, kv_len = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    expr = data.draw(mask_functions(max(q_len, kv_len)))
    layout = data.draw(st.sampled_from(["dense", "blocked"]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(2, HEADS, q_len, 8, generator=generator)
    k, v = (torch.randn(2, HEADS, kv_len, 8, generator=generator) for _ in range(2))
    want = reference_attention(q, k, v, brute_force(expr, q_len, kv_len))
    model = Attention(as_mask_mod(expr), q_len, kv_len, layout).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), want, rtol=0, atol=1e-5, msg=lambda m: f"{expr}: {m}")
    path = tmp_path / f"fuzz-{os.getpid()}-{abs(hash(repr(expr)))}.onnx"
    export_onnx(model, [q, k, v], path, lowering=layout, input_names=["q", "k", "v"], output_names=["out"])
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    for name in CPU_RUNTIMES:
        got = torch.from_numpy(runtimes.get(name).load(path, accuracy=True).run(feeds)["out"])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{name} {layout} {expr}: {m}")
