"""MoBA's attention written out per head and per query (float64), from the semantics of MoBA's naive reference
(github.com/MoonshotAI/MoBA, ``moba_naive.py``): gate = q . mean(keys of each block); a block that ends after the
query is never chosen, the query's own block always; of the rest the ``top_k - 1`` largest gates; then the causal
mask.  ``top_k`` counts the own block, as MoBA's ``moba_topk``.  Assumes no ties among the gates."""

import torch


def moba_attention(q, k, v, block, top_k, scale):
    B, H, N, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            means = [k[b, h, j : j + block].mean(0) for j in range(0, N, block)]
            for i in range(N):
                own = i // block
                gates = {j: float(q[b, h, i] @ means[j]) for j in range(own)}  # blocks that end before i
                chosen = sorted(gates, key=gates.get, reverse=True)[: top_k - 1] + [own]
                keys = [t for j in chosen for t in range(j * block, (j + 1) * block) if t <= i]
                scores = (k[b, h, keys] @ q[b, h, i]) * scale
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h, keys]
    return out
