"""Content-routed block-sparse attention (MoBA and your own routers): which key blocks a query attends is computed
from q and k in the model, so it is computed in the exported graph too, and only the chosen blocks are scored.

MoBA (Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", github.com/MoonshotAI/MoBA,
``moba/moba_naive.py``): the keys are split into blocks of ``block`` tokens; query i's gate for block j is
``q_i . mean(k of block j)`` (per head, unscaled); the query's own block is always chosen and blocks that end after
it never are; of the rest it takes the ``top_k - 1`` blocks with the largest gates (``top_k`` counts the own block,
as MoBA's ``moba_topk``); finally the causal mask applies, so of its own block a query sees the keys up to itself.

Ties between equal gates: the lower block index wins, everywhere.  Eager PyTorch sorts stably; the exported graph
uses ONNX TopK, whose specification breaks ties by the lower index (tests check onnxruntime and OpenVINO with forced
ties).  MoBA's reference uses ``torch.topk``, whose choice among ties is unspecified.  Gates that differ by less
than rounding can still rank differently on another runtime or in fp16; the choice is a declared hard decision
(:mod:`edgeattn.decisions`), so the parity check re-runs the reference with the runtime's choice where the two
differ within its ``decision_eps`` and reports how many did.

Where this differs from MoBA's reference: the sequence length must be a multiple of the block (MoBA lets the last
block be shorter); pad the sequence or choose a block that divides it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import decisions
from .attention import attend
from .errors import InvalidArgument

# (q (B, H, N, D), pooled keys (B, H, nb, D)) -> block scores (B, H, N, nb), or (B, H, N / block, nb) for one
# score per query block; larger is better, -inf never chosen
Router = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def moba_gate(q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
    """MoBA's gate: each query against each block's mean key, in float32 (as the reference computes it)."""
    return torch.matmul(q.float(), pooled_k.float().transpose(-1, -2))


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> the mean over each block of ``block`` tokens, (B, H, N / block, D)."""
    return x.unflatten(2, (-1, block)).mean(3)


def candidates(n: int, block: int, causal: bool, device=None) -> torch.Tensor:
    """(N, nb) bool: the blocks a query may be routed to, never its own; with ``causal`` only blocks before it."""
    own = torch.arange(n, device=device)[:, None] // block
    other = torch.arange(n // block, device=device)[None, :]
    return other < own if causal else other != own


def select_blocks(scores: torch.Tensor, allowed: torch.Tensor, count: int, name: str = "blocks") -> torch.Tensor:
    """The ``count`` allowed blocks with the largest scores per query, (B, H, N, count) int64, -1 where a query has
    fewer allowed blocks; ties go to the lower block index.  A declared hard decision (:func:`decisions.top_k`):
    parity explains choices that differ only among scores within rounding of each other."""
    # an additive 0 / -inf table rather than masked_fill: runtimes broadcast an Add much faster than a Where
    never = torch.where(allowed, 0.0, float("-inf")).to(scores.dtype)
    _, index = decisions.top_k(scores + never, count, name)
    # a chosen block is kept by the table, not by its score being finite: weight compression to fp16 (ovc's
    # default) turns the table's -inf into -65504, and a finite score must not let a disallowed block in
    kept = torch.gather(allowed.expand(*scores.shape[:-1], allowed.shape[-1]), -1, index)
    return torch.where(kept, index, -1)


def check_routing(block: int, top_k: int, n: Optional[int] = None) -> None:
    """One clear error for a block or top_k that is not a positive integer, or a block that does not divide ``n``
    tokens."""
    for name, value in (("block", block), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    if n is not None and n % block:
        raise InvalidArgument(
            f"routed attention splits the {n} tokens into blocks of {block}, which must divide them; "
            f"pad the sequence to a multiple of {block} or choose a block that divides {n}"
        )


def routed_attention(
    q,
    k,
    v,
    block: int,
    top_k: int,
    causal: bool = True,
    router: Optional[Router] = None,
    scale: Optional[float] = None,
    name: str = "",
) -> torch.Tensor:
    """Attention where each query attends its own block (causally with ``causal``) and the ``top_k - 1`` other
    blocks with the best ``router`` scores (default :func:`moba_gate`: MoBA).  q, k, v (B, H, N, D) -> (B, H, N, Dv).

    A router takes q and the mean-pooled keys (B, H, N / block, D) and returns scores per query (B, H, N, nb) or per
    query block (B, H, N / block, nb); it is traced into the exported graph, so write it with tensor ops."""
    n = q.shape[2]
    check_routing(block, top_k, n)
    if k.shape[2] != n:
        raise InvalidArgument(f"routed attention is self-attention over one sequence: q has {n} tokens, k {k.shape[2]}")
    scores = (router or moba_gate)(q, pool_blocks(k, block))
    nb = n // block
    if scores.shape[-1] != nb or scores.shape[-2] not in (n, nb):
        raise InvalidArgument(
            f"the router must return block scores shaped (B, H, {n}, {nb}) or (B, H, {nb}, {nb}), "
            f"got {tuple(scores.shape)}"
        )
    if scores.shape[-2] == nb and nb != n:  # one score row per query block: every query of the block uses it
        scores = scores.repeat_interleave(block, dim=-2)
    label = name or f"{'moba' if router is None else 'routed'}_b{block}_top{top_k}{'_causal' if causal else ''}"
    count = min(top_k - 1, nb - 1)
    if count:
        blocks = select_blocks(scores, candidates(n, block, causal, q.device), count, label)
    else:  # the own block alone
        blocks = torch.full((*scores.shape[:-1], 1), -1, dtype=torch.int64, device=q.device)
    local = torch.ones(block, block, dtype=torch.bool, device=q.device)
    local = local.tril() if causal else local
    return attend(q, k, v, "routed", [blocks, local, None], scale, label)
