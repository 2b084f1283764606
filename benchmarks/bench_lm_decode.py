"""Per-token decode cost of an LM at long contexts: edgeattn's caches sized by each layer's window, beside the same
files with a full-size cache on every layer and beside transformers eager, in one process.

    python benchmarks/bench_lm_decode.py [--models mistral gemma3] [--contexts 1024 4096 16384 32768] [--runs 20]

Models (random weights, built from their configs): ``mistral``, every layer sliding over 1,024 tokens; ``gemma3``,
five local layers (window 1,024) to one global.  6 layers, hidden 512, 8 query heads on 2 key/value heads of 64.

For each context N the files are exported for a cache of N + 64 positions (``max_cache_len``) and one decode step
is timed at position N over a cache filled with random keys and values: the runtime's call plus the host's write of
the new keys and values into the cache (:class:`edgeattn.lmloop.Cache`).  transformers eager runs one step over a
``DynamicCache`` holding N random positions (its sliding layers keep their window, as it does in ``generate``).

Columns: median ms per token over --runs after 3 warm-ups; cache MB (keys and values of all layers, one sequence);
KB returned per token (what the file hands back besides the logits: the new keys and values; a file returning its
whole cache would hand back the cache MB); "x 1k" = this row's time / its own time at the first context.
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_attention import median_ms

import edgeattn
from edgeattn import lmloop

warnings.filterwarnings("ignore")

WINDOW = 1024
SIZE = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=65536,
)


def build(name: str):
    import transformers

    if name == "mistral":
        config = transformers.MistralConfig(**SIZE, sliding_window=WINDOW)
    else:
        layer_types = ["sliding_attention"] * 5 + ["full_attention"]
        config = transformers.Gemma3TextConfig(**SIZE, sliding_window=WINDOW, layer_types=layer_types)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def edgeattn_rows(model, context: int, caches: str, runtimes, runs: int, folder: Path) -> list[dict]:
    edgeattn.export_lm(model, folder, chunk=16, max_cache_len=context + 64, caches=caches)
    config = lmloop.read_config(folder)
    cache = lmloop.Cache(config, batch=1)
    rng = np.random.default_rng(0)
    for array in cache.arrays.values():
        array[...] = rng.standard_normal(array.shape, np.float32)
    cache_mb = sum(a.nbytes for a in cache.arrays.values()) / 1e6
    feeds = {"input_ids": np.array([[5]]), "position": np.array([context]), **cache.arrays}
    rows = []
    for runtime in runtimes:
        session = edgeattn.load(folder / "decode.onnx", runtime)
        returned = [0]

        def step():
            out = session.run(feeds)
            returned[0] = cache.write(out, feeds["position"], np.array([1]))

        ms = median_ms(step, runs)
        label = "edgeattn, caches by window" if caches == "window" else "edgeattn, full cache on every layer"
        rows.append(dict(row=label, runtime=runtime, ms=ms, cache_mb=cache_mb, returned_kb=returned[0] / 1e3))
    return rows


def transformers_row(model, context: int, runs: int) -> dict:
    from transformers import DynamicCache

    text = model.config.get_text_config()
    cache = DynamicCache(config=model.config)
    shape = (1, text.num_key_value_heads, context, text.head_dim)
    for layer in range(text.num_hidden_layers):
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    position = [context]

    def step():
        with torch.no_grad():
            model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([position]), cache=cache, use_cache=True)
        position[0] += 1

    ms = median_ms(step, runs)
    kept = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 1e6
    return dict(row="transformers eager (DynamicCache)", runtime="torch", ms=ms, cache_mb=kept, returned_kb=None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mistral", "gemma3"], choices=["mistral", "gemma3"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    p.add_argument("--runtimes", nargs="+", default=["ort-cpu", "openvino-cpu"])
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; python {sys.version.split()[0]}")
    for name in args.models:
        model = build(name)
        first: dict = {}
        print(f"\n### {name}\n")
        print("| context | row | runtime | ms/token | x 1k | cache MB | KB returned/token |")
        print("|---|---|---|---|---|---|---|")
        for context in args.contexts:
            rows = [transformers_row(model, context, args.runs)]
            with tempfile.TemporaryDirectory() as tmp:
                for caches in ("window", "full"):
                    rows += edgeattn_rows(model, context, caches, args.runtimes, args.runs, Path(tmp) / caches)
            for r in rows:
                base = first.setdefault((r["row"], r["runtime"]), r["ms"])
                kb = "-" if r["returned_kb"] is None else f"{r['returned_kb']:.1f}"
                print(
                    f"| {context} | {r['row']} | {r['runtime']} | {r['ms']:.2f} | {r['ms'] / base:.2f} "
                    f"| {r['cache_mb']:.1f} | {kb} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
