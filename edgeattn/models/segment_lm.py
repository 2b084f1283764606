"""``segment-lm`` / ``segment-lm-decode``: a small Llama-style decoder exported as a prefill graph and a decode-step
graph over an explicit static KV cache.

Architecture, after Llama 3 (github.com/meta-llama/llama3, ``llama/model.py``): token embedding; pre-norm blocks
``h = x + attention(RMSNorm(x))``, ``out = h + feed_forward(RMSNorm(h))``; RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``;
rotary embeddings on interleaved channel pairs (2i, 2i+1) rotated by ``pos * theta^(-2i/head_dim)``, applied to
queries and keys before caching; grouped-query attention (query head h reads kv head ``h // (heads / kv_heads)``,
scale ``head_dim^-0.5``); SwiGLU ``w2(silu(w1 x) * w3 x)`` with hidden size ``2/3 * 4 * dim`` rounded up to
``multiple_of``; bias-free linears; final RMSNorm and an LM head, separate as in Llama 3 8B or tied to the
embedding (``tie_embeddings``) as in Llama 3.2 1B/3B.  Untied is the default: with random weights a tied head
mostly predicts the input token again, and greedy tests would compare runs of one repeated token.

KV cache, after ExecuTorch's static cache (github.com/pytorch/executorch, ``examples/models/llama/attention.py``,
``KVCache``) and transformers' ``StaticCache``: per layer (B, kv_heads, max_cache, head_dim), keys stored after
RoPE, the step's entry written at its absolute position.  Here the cache is a graph input and output (no mutable
buffers), stacked over layers: (layers, B, kv_heads, max_cache, head_dim).

Masks:
- Prefill (static table): MAS, Katz et al., "Segment-Based Attention Masking for GPTs" (arXiv 2412.18487):
  the prompt's segments attend bidirectionally inside themselves and causally to earlier segments; combined with
  StreamingLLM's visible set (github.com/mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py``,
  ``StartRecentKVCache``: the first ``n_sink`` tokens plus a recent ``window``).  The window bounds every span:
  a key is allowed iff the segment rule allows it and (it is a sink, or ``|q - k| <= window``), i.e.
  ``segments(ids) & (sinks(n_sink, window) | sliding_window(window, causal=False))``.  (``segments & sinks``
  alone would be plain ``sinks``: ``sinks`` is causal and would cancel the bidirectional segments.)
- Decode (computed in the graph from ``position``): slot k allowed iff ``k <= position`` and (``k < n_sink`` or
  ``position - k <= window``); generated tokens are causal, as in MAS.
Unlike StreamingLLM, which evicts cache entries and re-numbers positions inside the rolled cache
(``streaming_llm/pos_shift/modify_llama.py`` caches keys before RoPE and rotates them by their cache slot), the
static cache keeps absolute positions and evicts by masking, as FlexAttention's sink mask does (github.com/pytorch-labs/
attention-gym, ``attn_gym/masks/sink_attn.py``: causal and (``q - k <= window`` or ``k < sink_size``)).
So decoding after the prefill equals a full recomputation whose generated tokens are one-token segments.
"""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks
from ..attention import masked_attention
from ..errors import InvalidArgument
from ..layers import MaskTable, check_heads
from ..masks.base import check_int
from .registry import build, register


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    """RoPE on interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos); x (..., D), cos/sin (..., D/2).
    Written with real ops (the reference multiplies complex numbers, which ONNX has no type for)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def qkv(self, x, cos, sin):
        """(B, N, dim) -> q (B, heads, N, D), k and v (B, kv_heads, N, D); q and k rotated."""
        B, N, _ = x.shape
        q = self.wq(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def out(self, q, k, v, attend):
        """Attend q over (cached) k, v with ``attend(q, k, v)``, then project; GQA repeats each kv head."""
        rep = self.heads // self.kv_heads
        if rep > 1:  # kv head j serves query heads j*rep .. j*rep+rep-1
            k, v = (t.unsqueeze(2).expand(-1, -1, rep, -1, -1).flatten(1, 2) for t in (k, v))
        out = attend(q, k, v)  # (B, heads, N, D)
        return self.wo(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, eps):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, heads, kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, hidden)


class Decoder(nn.Module):
    """The Llama-style decoder's weights and layer loop (:meth:`run`), with rotary tables for ``positions``
    positions (called ``positions_name`` in errors).  Registered LMs add their inputs, masks and cache handling."""

    def __init__(
        self,
        vocab,
        dim,
        layers,
        heads,
        kv_heads,
        multiple_of,
        norm_eps,
        rope_theta,
        positions,
        tie_embeddings=False,
        positions_name="positions",
    ):
        super().__init__()
        for name, value in (
            ("vocab", vocab),
            ("dim", dim),
            ("layers", layers),
            ("heads", heads),
            ("kv_heads", kv_heads),
            ("multiple_of", multiple_of),
            (positions_name, positions),
        ):
            check_int(name, value, low=1)
        head_dim = check_heads(dim, heads, even_width=True)  # RoPE rotates channel pairs
        if heads % kv_heads:
            raise InvalidArgument(f"kv_heads={kv_heads} must divide heads={heads} (grouped-query attention)")
        self.vocab, self.kv_heads, self.head_dim = vocab, kv_heads, head_dim
        hidden = int(2 * 4 * dim / 3)
        hidden = multiple_of * -(-hidden // multiple_of)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        # The reference loads trained weights; random ones at std dim^-0.5 keep a tied head's logits at unit scale.
        nn.init.normal_(self.tok_embeddings.weight, std=dim**-0.5)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, hidden, norm_eps) for _ in range(layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = None if tie_embeddings else nn.Linear(dim, vocab, bias=False)
        freqs = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(positions).float(), freqs)  # (positions, head_dim / 2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def run(self, input_ids, cos, sin, attend, cache):
        """The decoder over ``input_ids``; ``cache(layer, k, v)`` returns the keys/values to attend over (and to
        return as the present cache).  Returns logits and the per-layer cached keys and values."""
        if input_ids.dtype != torch.int64:
            raise InvalidArgument(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        if not torch.onnx.is_in_onnx_export() and ((input_ids < 0) | (input_ids >= self.vocab)).any():
            raise InvalidArgument(
                f"input_ids must be token ids in [0, {self.vocab}), got values "
                f"{int(input_ids.min())}..{int(input_ids.max())}"
            )
        h = self.tok_embeddings(input_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attention.qkv(layer.attention_norm(h), cos, sin)
            k, v = cache(i, k, v)
            keys.append(k)
            values.append(v)
            h = h + layer.attention.out(q, k, v, attend)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        return logits, keys, values


class SegmentLM(Decoder):
    """The decoder and the prompt's segments, sinks and window, shared by both graphs; :class:`Prefill` and
    :class:`Decode` add the inputs, the mask and the cache handling.  Both take the same config and build the same
    parameters in the same order, so one seed gives both the same weights."""

    def __init__(
        self,
        vocab=512,
        dim=128,
        layers=4,
        heads=4,
        kv_heads=2,
        multiple_of=32,
        norm_eps=1e-5,
        rope_theta=500000.0,
        segments=(16, 24, 24),
        n_sink=4,
        window=24,
        max_cache=128,
        tie_embeddings=False,
    ):
        super().__init__(
            vocab,
            dim,
            layers,
            heads,
            kv_heads,
            multiple_of,
            norm_eps,
            rope_theta,
            max_cache,
            tie_embeddings,
            positions_name="max_cache",
        )
        if not isinstance(segments, (list, tuple)) or not segments:
            raise InvalidArgument(f"segments must be a non-empty list of segment lengths, got {segments!r}")
        lengths = [check_int("segment length", s, low=1) for s in segments]
        self.prompt_len = sum(lengths)
        if self.prompt_len > max_cache:
            raise InvalidArgument(
                f"the prompt ({self.prompt_len} tokens over segments {lengths}) does not fit the "
                f"cache (max_cache={max_cache}); raise max_cache or shorten the segments"
            )
        self.segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        self.n_sink = check_int("n_sink", n_sink)
        self.window = check_int("window", window, low=1)
        self.max_cache = max_cache


class Prefill(SegmentLM):
    """input_ids (B, T) -> logits (B, T, vocab), present_key / present_value (layers, B, kv_heads, max_cache, D)
    with positions >= T zero."""

    def __init__(self, **config):
        super().__init__(**config)
        mask = masks.segments(self.segment_ids) & (
            masks.sinks(self.n_sink, self.window) | masks.sliding_window(self.window, causal=False)
        )
        self.mask_table = MaskTable(mask, heads=1, q_len=self.prompt_len)

    def forward(self, input_ids):
        T = self.prompt_len
        if input_ids.ndim != 2 or input_ids.shape[1] != T:
            raise InvalidArgument(
                f"input_ids must be (batch, {T}): the prefill mask table is static for the segments' "
                f"{T} tokens; got {tuple(input_ids.shape)}"
            )
        logits, keys, values = self.run(
            input_ids, self.rope_cos[:T], self.rope_sin[:T], self.mask_table, lambda i, k, v: (k, v)
        )
        pad = (0, 0, 0, self.max_cache - T)  # (B, kv_heads, T, D) -> (B, kv_heads, max_cache, D)
        return logits, stack_layers([F.pad(k, pad) for k in keys]), stack_layers([F.pad(v, pad) for v in values])


def stack_layers(tensors: list) -> torch.Tensor:
    """``torch.stack`` of the per-layer caches, written as one Concat of 4-D tensors and a Reshape: onnx2tf
    1.29 moves a Concat of Unsqueezed 5-D tensors to the wrong axis (the cache came out (B, layers, ...))."""
    return torch.cat(tensors).unflatten(0, (len(tensors), -1))


class Decode(SegmentLM):
    """One step: input_ids (B, 1), position (B,), past_key / past_value (layers, B, kv_heads, max_cache, D) ->
    logits (B, 1, vocab), present_key / present_value (the step's k/v written at ``position``)."""

    def forward(self, input_ids, position, past_key, past_value):
        B = input_ids.shape[0]
        cache_shape = (len(self.layers), B, self.kv_heads, self.max_cache, self.head_dim)
        if input_ids.ndim != 2 or input_ids.shape[1] != 1:
            raise InvalidArgument(f"input_ids must be (batch, 1): one token per step, got {tuple(input_ids.shape)}")
        if position.shape != (B,) or position.dtype != torch.int64:
            raise InvalidArgument(
                f"position must be an int64 tensor of shape ({B},), got {tuple(position.shape)} {position.dtype}"
            )
        for name, past in (("past_key", past_key), ("past_value", past_value)):
            if tuple(past.shape) != cache_shape:
                raise InvalidArgument(
                    f"{name} must be (layers, batch, kv_heads, max_cache, head_dim) = {cache_shape}, "
                    f"got {tuple(past.shape)}"
                )
        if not torch.onnx.is_in_onnx_export() and ((position < 0) | (position >= self.max_cache)).any():
            raise InvalidArgument(
                f"position must be in [0, {self.max_cache}) (the static cache's length), got {position.tolist()}"
            )
        slots = torch.arange(self.max_cache, device=position.device)
        pos = position.view(B, 1, 1, 1)
        write = slots.view(1, 1, -1, 1) == pos  # (B, 1, max_cache, 1)
        keep = slots.view(1, 1, 1, -1)
        mask = (keep <= pos) & ((keep < self.n_sink) | (pos - keep <= self.window))  # (B, 1, 1, max_cache)
        name = f"decode_sinks_s{self.n_sink}_w{self.window}"
        cos = self.rope_cos.index_select(0, position).view(B, 1, 1, -1)
        sin = self.rope_sin.index_select(0, position).view(B, 1, 1, -1)
        logits, keys, values = self.run(
            input_ids,
            cos,
            sin,
            lambda q, k, v: masked_attention(q, k, v, mask, mask_name=name),
            lambda i, k, v: (torch.where(write, k, past_key[i]), torch.where(write, v, past_value[i])),
        )
        return logits, stack_layers(keys), stack_layers(values)


def greedy(prefill, decode, input_ids, steps: int) -> list[int]:
    """Greedy generation with a prefill and a decode-step function on numpy feeds (an onnx Session's ``run``, or
    :func:`torch_step` around a module): the prompt's last logits give the first token, then one step per token."""
    import numpy as np

    check_int("steps", steps, low=1)
    out = prefill({"input_ids": np.asarray(input_ids, dtype=np.int64)})
    tokens = [int(out["logits"][0, -1].argmax())]
    key, value, position = out["present_key"], out["present_value"], np.asarray(input_ids).shape[1]
    for _ in range(steps - 1):
        out = decode(
            {
                "input_ids": np.array([[tokens[-1]]], dtype=np.int64),
                "position": np.array([position], dtype=np.int64),
                "past_key": key,
                "past_value": value,
            }
        )
        tokens.append(int(out["logits"][0, -1].argmax()))
        key, value, position = out["present_key"], out["present_value"], position + 1
    return tokens


def torch_step(module: nn.Module, outputs=("logits", "present_key", "present_value")):
    """A module as a numpy-feeds function (what :func:`greedy` takes)."""

    def run(feeds):
        with torch.no_grad():
            result = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {name: t.numpy() for name, t in zip(outputs, result)}

    return run


@functools.lru_cache(maxsize=4)
def _example_prefill(seed: int, config_json: str):
    """The prefill of the registered example prompt for this seed: what the decode example's cache holds."""
    built = build("segment-lm", seed=seed, **json.loads(config_json))
    with torch.no_grad():
        return built.module(**built.inputs)


def _prefill_inputs(vocab, segments, **_):
    return {"input_ids": lambda g: torch.randint(0, vocab, (1, sum(segments)), generator=g)}


def _decode_inputs(**config):
    key = json.dumps(config, sort_keys=True)

    def cache(index):  # same seed -> same weights and prompt as the segment-lm example
        return lambda g: _example_prefill(g.initial_seed(), key)[index].clone()

    return {
        "input_ids": lambda g: torch.randint(0, config["vocab"], (1, 1), generator=g),
        "position": lambda g: torch.tensor([sum(config["segments"])]),
        "past_key": cache(1),
        "past_value": cache(2),
    }


CONFIG = dict(
    vocab=512,
    dim=128,
    layers=4,
    heads=4,
    kv_heads=2,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=500000.0,
    segments=[16, 24, 24],
    n_sink=4,
    window=24,
    max_cache=128,
    tie_embeddings=False,
)
OUTPUTS = ("logits", "present_key", "present_value")


@register(
    "segment-lm",
    "Llama-style LM prefill, 64 tokens in segments 16/24/24 (bidirectional inside, causal "
    "across, 4 sinks + window 24), 4 layers, GQA 4/2 heads -> logits and a 128-slot KV cache",
    _prefill_inputs,
    outputs=OUTPUTS,
    **CONFIG,
)
def segment_lm(**config) -> Prefill:
    return Prefill(**config)


@register(
    "segment-lm-decode",
    "segment-lm decode step: one token at `position` over the static 128-slot KV cache, "
    "sinks + window mask computed in the graph",
    _decode_inputs,
    outputs=OUTPUTS,
    batch_axes={"past_key": 1, "past_value": 1},
    **CONFIG,
)
def segment_lm_decode(**config) -> Decode:
    return Decode(**config)
