"""``moba-block`` and ``moba-lm``: attention routed by MoBA (mixture of block attention, github.com/MoonshotAI/MoBA;
semantics in :mod:`edgeattn.routing`).  Each query attends its own block causally and the ``top_k - 1`` earlier
blocks whose mean key best matches it; the choice is computed in the exported graph and only the chosen blocks are
scored (the ``routed`` lowering, :mod:`edgeattn.onnxfile.routed`).

``moba-lm`` is :mod:`.segment_lm`'s Llama-style :class:`~.segment_lm.Decoder` (RMSNorm, RoPE, GQA, SwiGLU) with MoBA
in every layer, as a prefill graph: input_ids -> logits.  MoBA's paper also trains hybrids whose last layers attend
fully; a layer that does is a plain causal MaskTable, which this model does not need.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgument
from ..layers import RoutedSelfAttention
from ..masks.base import check_int
from ..routing import check_routing, routed_attention
from .common import token_inputs
from .registry import register
from .segment_lm import Decoder


class MobaBlock(nn.Module):
    """(B, N, dim) tokens -> (B, N, dim): qkv projection, MoBA attention, output projection."""

    def __init__(self, dim: int = 64, heads: int = 2, seq_len: int = 8192, block: int = 128, top_k: int = 4):
        super().__init__()
        check_routing(block, top_k, check_int("seq_len", seq_len, low=1))
        self.seq_len = seq_len
        self.attn = RoutedSelfAttention(dim, heads, block, top_k)

    def forward(self, tokens):
        if tokens.shape[1] != self.seq_len:  # routing works at any multiple of the block; the file is static
            raise InvalidArgument(f"moba-block was built for {self.seq_len} tokens, got {tokens.shape[1]}")
        return self.attn(tokens)


class MobaLM(Decoder):
    """input_ids (B, seq_len) int64 -> logits (B, seq_len, vocab)."""

    def __init__(
        self,
        vocab=512,
        dim=128,
        layers=2,
        heads=4,
        kv_heads=2,
        multiple_of=32,
        norm_eps=1e-5,
        rope_theta=500000.0,
        seq_len=1024,
        block=64,
        top_k=3,
    ):
        super().__init__(
            vocab, dim, layers, heads, kv_heads, multiple_of, norm_eps, rope_theta, seq_len, positions_name="seq_len"
        )
        check_routing(block, top_k, seq_len)
        self.seq_len, self.block, self.top_k = seq_len, block, top_k

    def forward(self, input_ids):
        if input_ids.ndim != 2 or input_ids.shape[1] != self.seq_len:
            raise InvalidArgument(
                f"input_ids must be int64 token ids of shape (batch, {self.seq_len}), got {tuple(input_ids.shape)}"
            )
        logits, _, _ = self.run(
            input_ids,
            self.rope_cos,
            self.rope_sin,
            lambda q, k, v: routed_attention(q, k, v, self.block, self.top_k),
            lambda i, k, v: (k, v),
        )
        return logits


register(
    "moba-block",
    "causal attention block with MoBA routing, 8192 tokens, blocks of 128, each query its own "
    "block + the top-3 earlier blocks, 2 heads x 32",
    token_inputs,
    dim=64,
    heads=2,
    seq_len=8192,
    block=128,
    top_k=4,
)(MobaBlock)


def _lm_inputs(vocab, seq_len, **_):
    return {"input_ids": lambda g: torch.randint(0, vocab, (1, seq_len), generator=g)}


@register(
    "moba-lm",
    "Llama-style LM prefill with MoBA in every layer, 1024 tokens, blocks of 64, top-3 (own block "
    "included), 2 layers, GQA 4/2 heads -> logits",
    _lm_inputs,
    outputs=("logits",),
    vocab=512,
    dim=128,
    layers=2,
    heads=4,
    kv_heads=2,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=500000.0,
    seq_len=1024,
    block=64,
    top_k=3,
)
def moba_lm(**config) -> MobaLM:
    return MobaLM(**config)
