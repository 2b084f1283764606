"""A transformers causal LM on edgeattn: export prefill + decode-step files, generate greedily with onnxruntime.

    python samples/convert_hf_lm.py [--prompt-len 32] [--new-tokens 8] [--out DIR]

The model is a tiny Llama built from its config with random weights (nothing is downloaded); a checkpoint from
``AutoModelForCausalLM.from_pretrained`` goes through the same calls.  The prefill attends through static mask
tables compiled for the prompt length, the decode step over a static cache of --prompt-len + --new-tokens slots.
"""

import argparse
import tempfile

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from edgeattn.export import export_lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-lm-"), help="output folder")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len))
    prefill_path, decode_path = export_lm(model, args.prompt_len, args.prompt_len + args.new_tokens, args.out)

    # greedy generation with plain onnxruntime: nothing below needs edgeattn or torch
    prefill = ort.InferenceSession(str(prefill_path), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(decode_path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in decode.get_inputs()][2:]  # past_key_values.N.key / .value
    logits, *cache = prefill.run(None, {"input_ids": prompt.numpy()})
    tokens = [int(logits[0, -1].argmax())]
    for step in range(args.new_tokens - 1):
        feeds = {
            "input_ids": np.array([[tokens[-1]]]),
            "cache_position": np.array([args.prompt_len + step]),
            **dict(zip(past_names, cache)),
        }
        logits, *cache = decode.run(None, feeds)
        tokens.append(int(logits[0, -1].argmax()))

    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0, args.prompt_len :].tolist()
    print(f"files:       {prefill_path}, {decode_path}")
    print(f"onnxruntime: {tokens}")
    print(f"transformers: {want}  ({'same' if tokens == want else 'DIFFERENT'})")
    raise SystemExit(0 if tokens == want else 1)


if __name__ == "__main__":
    main()
