"""Generate from a folder written by :func:`edgeattn.export_lm` on any of edgeattn's runtimes: the checks and the
runtime sessions; the loop itself is :mod:`edgeattn.lmloop` (numpy only, so a device can carry it)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from . import lmloop
from .errors import BadFile, InvalidArgument
from .runtimes import load


def generate(
    folder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    runtime: str = "auto",
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[list[int]]:
    """Each prompt (a list of token ids) followed by its generated tokens, as one batch.

    Greedy unless ``temperature`` > 0, which samples after ``top_k`` (0: all tokens) and ``top_p`` (nucleus) with a
    numpy generator seeded by ``seed``.  A row ends at ``max_new_tokens`` or at a stop token (default: the model's
    ``eos_token_id``; ``()`` for none), which it keeps.  ``on_token(row, token)`` is called for each token as it is
    chosen (streaming).  ``runtime``: any of :func:`edgeattn.runtime_names`; the files run at their own precision
    (OpenVINO is kept from computing an fp32 file in bf16)."""
    folder = Path(folder)
    try:
        config = lmloop.read_config(folder)
    except (OSError, ValueError) as e:
        raise BadFile(f"{folder} is not a folder written by export_lm ({lmloop.CONFIG}: {e})") from None
    prompts = _checked(prompts, config["vocab_size"])
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise InvalidArgument(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (temperature >= 0 and isinstance(top_k, int) and top_k >= 0 and 0 < top_p <= 1):
        raise InvalidArgument(
            f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, "
            f"got temperature={temperature!r}, top_k={top_k!r}, top_p={top_p!r}"
        )
    longest = max(len(p) for p in prompts)
    fixed = [layer["slots"] for layer in config["layers"] if not lmloop.is_ring(layer)]
    if fixed and longest + max_new_tokens > min(fixed):
        raise InvalidArgument(
            f"a prompt of {longest} tokens and {max_new_tokens} new ones do not fit the global layers' cache of "
            f"{min(fixed)} positions: export with a larger max_cache_len, or ask for fewer tokens"
        )
    sessions = [load(folder / f"{part}.onnx", runtime, accuracy=True) for part in ("prefill", "decode")]
    prefill, decode = (session.run for session in sessions)
    stops = config["eos_token_id"] if stop_tokens is None else list(stop_tokens)
    size = config["batch"] or len(prompts)  # a file with a fixed batch takes the prompts in groups of its size
    tokens: list[list[int]] = []
    for first in range(0, len(prompts), size):
        group = prompts[first : first + size]
        fill = group + [group[-1]] * (size - len(group))  # rows that fill a fixed batch: generated, then dropped

        def seen(row: int, token: int, first=first, real=len(group)) -> None:
            if on_token is not None and row < real:
                on_token(first + row, token)

        rows = lmloop.generate(
            prefill,
            decode,
            config,
            fill,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_tokens=stops,
            on_token=seen,
        )
        tokens += rows[: len(group)]
    return tokens


def _checked(prompts, vocab: int) -> list[list[int]]:
    """The prompts as lists of ints, each non-empty and within the vocabulary, or one clear error."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or not len(prompts):
        raise InvalidArgument("prompts must be a list of prompts, each a list of token ids: [[5, 9, 2], [7, 1]]")
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            row = [int(t) for t in prompt]
            exact = all(int(t) == t for t in prompt)
        except (TypeError, ValueError):
            row, exact = [], False
        if not row or not exact or min(row) < 0 or max(row) >= vocab:
            raise InvalidArgument(
                f"prompt {i} must be a non-empty list of token ids in [0, {vocab}), got {str(prompt)[:60]}; "
                f"prompts is a list of prompts: [[5, 9, 2], [7, 1]]"
            )
        rows.append(row)
    return rows
