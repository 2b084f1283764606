"""Greedy generation from an export_lm folder with OpenVINO GenAI's LLMPipeline alone.

usage: python genai_generate.py FOLDER PROMPTS_JSON STEPS

Prints {"tokens": [[new tokens of each prompt, generated alone]], "text": the first prompt's new text, from its text
"t5 t9 ..." through the folder's tokenizer}.  Importing edgeattn is blocked, as on a device that does not have it.
"""

import json
import sys

sys.modules["edgeattn"] = None  # any `import edgeattn` now raises ImportError

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import openvino_genai  # noqa: E402


def main():
    folder, prompts, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    # SDPA: the stateful pipeline (the paged-attention one looks for OpenVINO's own attention op); f32: a CPU with
    # AVX512-BF16 would otherwise run this fp32 IR in bf16
    pipe = openvino_genai.LLMPipeline(folder, "CPU", ATTENTION_BACKEND="SDPA", INFERENCE_PRECISION_HINT="f32")
    config = openvino_genai.GenerationConfig(max_new_tokens=steps, ignore_eos=True)
    tokens = []
    for prompt in prompts:
        ids, mask = np.array([prompt], np.int64), np.ones((1, len(prompt)), np.int64)
        result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(mask)), config)
        tokens.append(list(result.tokens[0]))
    text = pipe.generate(" ".join(f"t{t}" for t in prompts[0]), config)
    print(json.dumps({"tokens": tokens, "text": str(text)}))


if __name__ == "__main__":
    main()
