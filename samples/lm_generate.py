"""Greedy generation with an exported prefill graph and decode-step graph (static KV cache), checked against PyTorch.

    python samples/lm_generate.py [--runtime ort-cpu] [--tokens 32] [--prefill FILE --decode FILE] [--out DIR]

Without --prefill/--decode it exports `segment-lm` and `segment-lm-decode` first.  The prompt is the registered
example prompt (64 tokens in three segments); the cache is fed back from each step's present_key/present_value.
"""

import argparse
import tempfile
import time
from pathlib import Path

import edgeattn
from edgeattn import models, onnxfile
from edgeattn.models.segment_lm import greedy, torch_step
from edgeattn.registered import export_registered


def timed(generate):
    start = time.perf_counter()
    tokens = generate()
    return tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="auto", help="ort-cpu, openvino-cpu, ort-cuda or auto")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate (the cache holds 128 positions)")
    parser.add_argument("--prefill", help="an exported segment-lm file (default: export one)")
    parser.add_argument("--decode", help="an exported segment-lm-decode file (default: export one)")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-lm-"), help="where to export")
    args = parser.parse_args()

    # 1. The two graphs share weights: same registered config and seed.
    paths = {}
    for name, given in (("segment-lm", args.prefill), ("segment-lm-decode", args.decode)):
        if given:
            paths[name] = Path(given)
        else:
            result = export_registered(name, Path(args.out) / f"{name}.onnx")
            print(f"exported {result.path} ({result.file_bytes / 1e6:.1f} MB)")
            paths[name] = result.path
    # the torch reference of each file, rebuilt from its metadata (model, config, seed)
    try:
        prefill, decode = (
            models.from_metadata(onnxfile.read_metadata(onnxfile.read(paths[name])), paths[name]) for name in paths
        )
    except edgeattn.EdgeAttnError as e:
        parser.error(str(e))
    if (prefill.name, decode.name) != tuple(paths) or prefill.config != decode.config:
        parser.error(
            f"--prefill/--decode must be segment-lm and segment-lm-decode files exported with the same "
            f"config, got {prefill.name} and {decode.name}"
        )
    prompt = prefill.inputs["input_ids"].numpy()
    if args.tokens < 1 or prompt.shape[1] + args.tokens > prefill.config["max_cache"]:
        parser.error(
            f"--tokens must be at least 1 and fit the cache with the prompt: {prompt.shape[1]} + "
            f"{args.tokens} tokens, {prefill.config['max_cache']} positions"
        )

    # 2. Eager PyTorch first: runtime thread pools left spinning after their runs would slow it down.
    steps = torch_step(prefill.module), torch_step(decode.module)
    greedy(*steps, prompt, 2)
    expected, torch_seconds = timed(lambda: greedy(*steps, prompt, args.tokens))

    # 3. The runtime: prefill once, then one decode step per token.
    sessions = [edgeattn.load(paths[name], runtime=args.runtime) for name in ("segment-lm", "segment-lm-decode")]
    greedy(sessions[0].run, sessions[1].run, prompt, 2)  # warm-up: first runs allocate
    tokens, seconds = timed(lambda: greedy(sessions[0].run, sessions[1].run, prompt, args.tokens))

    print(f"{sessions[0].runtime:13s} {tokens}  {args.tokens / seconds:.0f} tokens/s")
    print(f"{'torch':13s} {expected}  {args.tokens / torch_seconds:.0f} tokens/s")
    print("tokens match" if tokens == expected else "tokens DIFFER")
    raise SystemExit(0 if tokens == expected else 1)


if __name__ == "__main__":
    main()
