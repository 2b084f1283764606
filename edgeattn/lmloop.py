"""The host side of an exported LM folder: its caches and the generation loop, in numpy alone.

This file imports nothing from edgeattn, so a device that has only numpy and a runtime can carry it as is
(``python lmloop.py FOLDER 5,9,2 7,1`` runs the folder on onnxruntime); :func:`edgeattn.generate` runs it over
edgeattn's runtimes.  The folder (see :func:`edgeattn.export_lm`) holds ``prefill.onnx`` (a chunk of C tokens per
row), ``decode.onnx`` (one token per row) and ``edgeattn_lm.json``.  Both files take ``input_ids`` (B, C),
``position`` (B,): each row's first position, and ``past_key_values.N.key/value`` (B, kv_heads, slots, head_dim);
they return ``logits`` (B, C, vocab) and ``present.N.key/value`` (B, kv_heads, C, head_dim), the chunk's new keys
and values only, which :class:`Cache` writes in place: at slot ``position`` in a global layer, at ``position mod
window`` in a sliding layer's ring (after its sinks, when it keeps some).

Prompts of different lengths share a batch: chunk t feeds tokens [tC, tC + C) of every row, padded after a row's
end; a row's generation starts from the logits of its last prompt token; then each decode step feeds every row
its last token at its own position.  A row's tokens are the ones it would get alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

CONFIG = "edgeattn_lm.json"
Run = Callable[[dict], dict]  # feeds -> outputs, by name


def read_config(folder) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text())


def is_ring(layer: dict) -> bool:
    """A sliding layer's ring: its sinks, then position p >= sinks at slot ``sinks + (p - sinks) mod window``."""
    return layer["window"] is not None and layer["slots"] == layer.get("sinks", 0) + layer["window"]


class Cache:
    """Each layer's keys and values for a batch, (B, kv_heads, slots, head_dim), written in place."""

    def __init__(self, config: dict, batch: int):
        self.layers = config["layers"]
        heads, dim = config["kv_heads"], config["head_dim"]
        self.arrays = {
            f"past_key_values.{i}.{kind}": np.zeros((batch, heads, layer["slots"], dim), np.float32)
            for i, layer in enumerate(self.layers)
            for kind in ("key", "value")
        }

    def write(self, outputs: dict, positions: np.ndarray, counts: np.ndarray) -> int:
        """Write each row's first ``counts[b]`` new keys and values (positions[b] onwards); returns bytes written."""
        written = 0
        for i, layer in enumerate(self.layers):
            sinks, window = layer.get("sinks", 0), layer["window"]
            for kind in ("key", "value"):
                new, cache = outputs[f"present.{i}.{kind}"], self.arrays[f"past_key_values.{i}.{kind}"]
                for b, n in enumerate(counts):
                    pos = positions[b] + np.arange(n)
                    keep, slots = np.ones(n, bool), pos
                    if is_ring(layer) and n:  # the sinks, and of the rest only the last `window` positions
                        keep = (pos < sinks) | (pos > max(pos[-1] - window, sinks - 1))
                        slots = np.where(pos < sinks, pos, sinks + (pos - sinks) % window)
                    kept = new[b, :, :n][:, keep]  # (kv_heads, kept, head_dim)
                    cache[b, :, slots[keep]] = kept.transpose(1, 0, 2)
                    written += kept.nbytes
        return written


def choose(logits: np.ndarray, rng, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """(B, vocab) -> (B,) next tokens: greedy at temperature 0, else sampled after temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.astype(np.float64) / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:  # the most probable tokens whose mass reaches top_p (the first always)
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep = np.zeros(probs.shape, bool)
        np.put_along_axis(keep, order, np.cumsum(sorted_probs, -1) - sorted_probs < top_p, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(
    prefill: Run,
    decode: Run,
    config: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_tokens: Sequence[int] = (),
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[list[int]]:
    """Each prompt followed by its generated tokens (up to ``max_new_tokens``, ending at a stop token when one
    comes); ``on_token(row, token)`` sees each token as it is chosen.  ``prefill``/``decode`` run the files."""
    chunk, pad = config["chunk"], config["pad_token_id"]
    batch, lengths = len(prompts), np.array([len(p) for p in prompts])
    cache = Cache(config, batch)
    last = [np.empty(0, np.float32)] * batch  # each row's logits at its last prompt token
    for start in range(0, int(lengths.max()), chunk):
        counts = np.clip(lengths - start, 0, chunk)
        ids = np.full((batch, chunk), pad, np.int64)
        for b, n in enumerate(counts):
            ids[b, :n] = prompts[b][start : start + n]
        positions = np.full(batch, start, np.int64)
        out = prefill({"input_ids": ids, "position": positions, **cache.arrays})
        cache.write(out, positions, counts)
        for b, n in enumerate(counts):
            if n and start + n == lengths[b]:
                last[b] = out["logits"][b, n - 1]
    rng = np.random.default_rng(seed)
    tokens, done = [list(map(int, p)) for p in prompts], np.zeros(batch, bool)
    logits = np.stack(last)
    for step in range(max_new_tokens):
        chosen = choose(logits, rng, temperature, top_k, top_p)
        for row in map(int, np.flatnonzero(~done)):
            tokens[row].append(int(chosen[row]))
            if on_token is not None:
                on_token(row, int(chosen[row]))
            done[row] = int(chosen[row]) in stop_tokens
        if done.all() or step == max_new_tokens - 1:
            break
        positions = lengths + step  # the position of the token fed now, the last one chosen
        out = decode({"input_ids": chosen[:, None].astype(np.int64), "position": positions, **cache.arrays})
        cache.write(out, positions, (~done).astype(np.int64))
        logits = out["logits"][:, 0]
    return tokens


def onnxruntime_runs(folder) -> tuple[Run, Run]:
    """prefill.onnx and decode.onnx on onnxruntime's CPU provider, as :data:`Run` callables."""
    import onnxruntime

    def run(path):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(None, feeds)))

    return run(Path(folder) / "prefill.onnx"), run(Path(folder) / "decode.onnx")


if __name__ == "__main__":  # python lmloop.py FOLDER PROMPT [PROMPT...] (comma-separated token ids), greedy
    folder, config = sys.argv[1], read_config(sys.argv[1])
    prompts = [[int(t) for t in arg.split(",")] for arg in sys.argv[2:]]
    for row in generate(*onnxruntime_runs(folder), config, prompts, 16, stop_tokens=config["eos_token_id"]):
        print(",".join(map(str, row)))
