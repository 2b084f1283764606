"""A transformers causal LM on the edge: export fixed-shape chunk and decode files, generate a batch, compare.

    python samples/convert_hf_lm.py [--model mistral|gemma3|llama] [--new-tokens 48] [--runtime ort-cpu] [--out DIR]

The model is tiny, built from its config with random weights (nothing is downloaded); a checkpoint from
``AutoModelForCausalLM.from_pretrained`` goes through the same calls.  Three prompts of different lengths go in one
batch; each row's tokens are compared with transformers' ``generate`` on that prompt alone (exit 1 if they differ).
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig

import edgeattn

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {  # a sliding window of 16 where the architecture has one
    "mistral": lambda: MistralConfig(**TINY, num_key_value_heads=2, sliding_window=16),
    "gemma3": lambda: Gemma3TextConfig(
        **TINY,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "llama": lambda: LlamaConfig(**TINY, num_key_value_heads=2),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="mistral")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runtime", default="ort-cpu", help="any of edgeattn.runtime_names()")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="edgeattn-lm-"), help="output folder")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[args.model]()).eval()
    model.generation_config.eos_token_id = None  # random weights: no stop token, every row runs to --new-tokens
    folder = edgeattn.export_lm(model, args.out, chunk=16, max_cache_len=128)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (21, 5, 40)]
    rows = edgeattn.generate(folder, prompts, max_new_tokens=args.new_tokens, runtime=args.runtime)

    same = True
    for prompt, row in zip(prompts, rows):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
        same &= row == want
        print(f"{len(prompt):3d}-token prompt: {row[len(prompt) :][:12]}... {'same' if row == want else 'DIFFERENT'}")
    print(f"{folder}: {args.runtime} {'matches' if same else 'differs from'} transformers' generate")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
