"""FlexAttention-signature ``(b, h, q, kv)`` mask_mods and bias_mods written from scratch, the scalar loop that
evaluates one the brute-force way, and the shaped mask cases the dense and block table tests share."""

import torch

from edgeattn.masks import causal, custom, neighborhood, segments, sinks, sliding_window, window

DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])  # document ids of 12 tokens, for doc_mod


def causal_mod(b, h, q, kv):
    """Causal mask_mod, as torch.nn.attention.flex_attention's documentation writes it: q >= kv."""
    return q >= kv


def doc_mod(b, h, q, kv):
    """Document mask_mod (FlexAttention's document masking): tokens of the same document in :data:`DOC`."""
    return DOC[q] == DOC[kv]


def head_mod(b, h, q, kv):
    """Per-head causal window mask_mod: head h looks back h+1 tokens."""
    return (q >= kv) & (q - kv <= h + 1)


def dist_bias(b, h, q, kv):
    """Distance bias_mod (an ALiBi-style penalty of slope 1): -|q - kv| as float32."""
    return -(q - kv).abs().float()


def head_bias(b, h, q, kv):
    """Per-head causal bias_mod: 0.5 * (h + 1) where kv <= q, 0 elsewhere."""
    return (h + 1).float() * 0.5 * (q >= kv).float()


def loop_table(fn, heads, q_len, kv_len, dtype=torch.bool):
    """Brute force: call the function on scalar index tensors, one (h, q, kv) at a time (the (heads, q, kv) table
    FlexAttention's create_mask builds from a mask_mod, for batch 0)."""
    out = torch.zeros(heads, q_len, kv_len, dtype=dtype)
    z = torch.tensor(0)
    for h in range(heads):
        for q in range(q_len):
            for kv in range(kv_len):
                out[h, q, kv] = fn(z, torch.tensor(h), torch.tensor(q), torch.tensor(kv))
    return out


# (mask, shape) for each kind of mask the table builders must agree with materialize() on: every sequence family,
# dilated/strided/causal/3-D neighborhoods, a shifted window, a per-head and a data-dependent custom mask_mod
SHAPED = [
    (causal(), dict(q_len=9, kv_len=13)),
    (sliding_window(3, causal=False), dict(q_len=10)),
    (sinks(2, 3), dict(q_len=5, kv_len=11)),
    (segments([0, 0, 1, 1, 1, 2, 3, 3]), dict(q_len=8)),
    (neighborhood((3, 2), (1, 2), (2, 1), (True, False)), dict(grid=(6, 5))),
    (neighborhood(3, 2, 2), dict(grid=(6, 7, 6))),
    (window((2, 4), (1, 3)), dict(grid=(6, 8))),
    (custom(head_mod), dict(q_len=12)),
    (custom(doc_mod), dict(q_len=12)),
]
