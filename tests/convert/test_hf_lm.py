"""transformers causal LMs on edgeattn's "edgeattn" attention implementation, against transformers' eager model.

Tiny random models (weights cannot be downloaded; the code path is what is tested): 2 layers, 4 query heads on 2
key/value heads and a sliding window of 8 where the architecture has one, so windows bite.  Each model is exported
once by export_lm (chunks of 8 tokens, a cache of 48) and generates 26 tokens (3x the window) after three prompts of
13, 6 and 16 tokens in one batch on onnxruntime and OpenVINO.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import edgeattn
from edgeattn import EdgeAttnError, lmloop, runtimes
from edgeattn.convert import hf_lm, lm_step
from edgeattn.errors import InvalidArgument
from edgeattn.export import export_lm

transformers = pytest.importorskip("transformers")

from conftest import CPU_RUNTIMES, require  # noqa: E402

CHUNK, CACHE, NEW_TOKENS, WINDOW = 8, 48, 26, 8
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**TINY, **kw),
    "mistral": lambda window=WINDOW: transformers.MistralConfig(**TINY, sliding_window=window),
    # a local (sliding) layer and a global one; Gemma 3 scales queries by query_pre_attn_scalar**-0.5
    "gemma3": lambda window=WINDOW: transformers.Gemma3TextConfig(
        **TINY,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
    ),
    "qwen2": lambda **kw: transformers.Qwen2Config(**TINY, **kw),
    # local and global layers with attention soft-capping, small enough to bite on tiny random weights
    "gemma2": lambda window=WINDOW, softcap=1.0: transformers.Gemma2Config(
        **TINY,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=softcap,
    ),
}
SLIDING = ("mistral", "gemma3", "gemma2")
PROMPTS = [
    torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (13, 6, 16)
]
PLAIN = Path(__file__).with_name("plain_generate.py")
GENAI = Path(__file__).with_name("genai_generate.py")


def build(name: str, attn: str = "eager", state=None, **config):
    if attn == "edgeattn":
        hf_lm.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # random weights: generate the same number of tokens as the loop
    if state is not None:
        model.load_state_dict(state)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# each model's tests on one xdist worker, so that its folder is exported once
LM = {name: pytest.param(name, marks=pytest.mark.xdist_group(f"lm-{name}")) for name in CONFIGS}


@pytest.fixture(scope="module", params=LM.values())
def lm(request, tmp_path_factory):
    """(name, eager model, prompts, folder written by export_lm)."""
    name = request.param
    model = build(name)
    genai = dict(openvino_genai=True, tokenizer=tiny_tokenizer()) if name == "gemma3" else {}
    folder = export_lm(model, tmp_path_factory.mktemp(name), chunk=CHUNK, max_cache_len=CACHE, **genai)
    return name, model, PROMPTS, folder


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built here (nothing is downloaded): t2 -> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, TINY["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<pad>", pad_token="<pad>", eos_token="</s>"
    )


def test_edgeattn_logits_match_eager(lm):
    name, model, prompts, _ = lm
    prompt = torch.tensor([prompts[0]])
    want = logits(model, prompt)
    direct = build(name, "edgeattn", model.state_dict())  # attn_implementation="edgeattn", dense masks
    converted, lines = edgeattn.convert(model, prompt, report=True)  # static tables for the prompt length
    torch.testing.assert_close(logits(direct, prompt), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(converted, prompt), want, atol=1e-5, rtol=0)
    kinds = {
        "mistral": [f"sliding_window_{WINDOW}"] * 2,
        "gemma3": [f"sliding_window_{WINDOW}", "causal"],
        "gemma2": [f"sliding_window_{WINDOW}", "causal"],
    }.get(name, ["causal"] * 2)
    assert [line.split(" -> edgeattn ")[1].split(" (")[0] for line in lines] == kinds, lines
    assert lines[0].startswith("model.layers.0.self_attn: transformers ") and f"({len(prompts[0])} tokens, " in lines[0]
    assert model.config._attn_implementation == "eager"  # the original is untouched


def reference_generation(model, prompt):
    """transformers' greedy ``generate`` on one prompt alone: the new tokens and its logits at each step."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [step[0].numpy() for step in out.logits]


def recorded(run, log: list):
    """A step runner that also keeps each call's logits."""

    def call(feeds):
        out = run(feeds)
        log.append(out["logits"])
        return out

    return call


def steps_of(prefill_log, decode_log, prompts):
    """Per row, the logits each generated token was chosen from: its last prompt position, then each decode step."""
    rows = []
    for b, prompt in enumerate(prompts):
        last_chunk, at = divmod(len(prompt) - 1, CHUNK)
        rows.append([prefill_log[last_chunk][b, at]] + [step[b, 0] for step in decode_log])
    return rows


def assert_steps_match(tokens, steps, want_tokens, want_steps, atol, label):
    """Every step's logits within ``atol`` of transformers' (while the tokens fed so far agree), then the tokens."""
    for step, (got, want) in enumerate(zip(steps, want_steps)):
        if tokens[:step] != want_tokens[:step]:
            break  # this step was fed another token: the token comparison below reports it
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"{label}: logits of step {step}")
    assert tokens == want_tokens, label


@pytest.fixture(scope="module")
def references(lm):
    return [reference_generation(lm[1], prompt) for prompt in lm[2]]


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_batched_generation_matches_generate(lm, references, runtime):
    """Three prompts of different lengths (one chunk and a bit, less than a chunk, two chunks exactly) in one
    batch, generating 3x the window: each row's tokens are transformers' for that prompt alone, and every step's
    logits within the runtime's fp32 tolerance."""
    require(runtime)
    name, model, prompts, folder = lm
    prefill_log, decode_log = [], []
    runs = [
        recorded(edgeattn.load(folder / f"{p}.onnx", runtime, accuracy=True).run, log)
        for p, log in (("prefill", prefill_log), ("decode", decode_log))
    ]
    got = lmloop.generate(*runs, lmloop.read_config(folder), prompts, NEW_TOKENS)
    atol = runtimes.get(runtime).tolerance("fp32").atol
    for b, (prompt, row, steps) in enumerate(zip(prompts, got, steps_of(prefill_log, decode_log, prompts))):
        assert row[: len(prompt)] == prompt
        assert_steps_match(row[len(prompt) :], steps, *references[b], atol, f"{name} row {b} on {runtime}")


@pytest.mark.parametrize(
    "lm", [LM[name] for name in SLIDING], indirect=True
)  # the architectures with a sliding window (not a skip)
def test_sliding_layers_keep_a_ring_of_their_window(lm, references):
    """A sliding layer's cache is its window, a global layer's max_cache_len, in the config and the files; and the
    window bites: the same weights with a window beyond the sequence give other logits."""
    name, model, prompts, folder = lm
    windows = lm_step.layer_windows(model.config)
    slots = [w or CACHE for w in windows]
    assert [layer["slots"] for layer in lmloop.read_config(folder)["layers"]] == slots
    for part in ("prefill", "decode"):
        inputs = {i.name: i for i in onnx.load(str(folder / f"{part}.onnx"), load_external_data=False).graph.input}
        for layer, size in enumerate(slots):
            dims = inputs[f"past_key_values.{layer}.key"].type.tensor_type.shape.dim
            assert dims[2].dim_value == size, (part, layer)
    sequence = torch.tensor([prompts[0] + references[0][0]])
    full = build(name, state=model.state_dict(), window=4 * sequence.shape[1])
    assert np.abs(logits(full, sequence).numpy() - logits(model, sequence).numpy()).max() > 1e-2


def run_alone(script: Path, folder: Path, prompts: list) -> dict:
    """What ``script`` (which blocks importing edgeattn) prints as JSON, generating NEW_TOKENS after ``prompts``."""
    done = subprocess.run(
        [sys.executable, str(script), str(folder), json.dumps(prompts), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_plain_runtimes_generate_without_edgeattn(lm, references, tmp_path):
    """A deployment's view: lmloop.py carried alone, over plain onnxruntime and plain OpenVINO, in a process that
    cannot import edgeattn."""
    name, model, prompts, folder = lm
    results = run_alone(PLAIN, folder, prompts)
    assert set(results) == {"onnxruntime", "openvino"}
    for runtime, rows in results.items():
        assert [row[len(p) :] for p, row in zip(prompts, rows)] == [tokens for tokens, _ in references], runtime


@pytest.mark.parametrize("lm", [LM["gemma3"]], indirect=True)
def test_openvino_genai_llm_pipeline_generates_the_same_tokens(lm, references):
    """The folder in OpenVINO GenAI's LLMPipeline (its stateful IR keeps the window-sized caches as variables), in a
    process that cannot import edgeattn: from token ids and from text through the converted tokenizer."""
    name, model, prompts, folder = lm
    results = run_alone(GENAI, folder, prompts)
    assert results["tokens"] == [tokens for tokens, _ in references]
    assert results["text"] == " ".join(f"t{t}" for t in references[0][0])


@pytest.mark.parametrize("lm", [LM["llama"]], indirect=True)
def test_sampling_stop_tokens_and_streaming(lm, references):
    """Sampling is reproducible from its seed and follows top_k (top_k=1 is greedy); a stop token ends its row
    (kept); on_token sees each row's tokens in order."""
    _, _, prompts, folder = lm
    greedy = [p + tokens for p, (tokens, _) in zip(prompts, references)]
    options = dict(max_new_tokens=NEW_TOKENS, runtime="ort-cpu", temperature=0.8, top_p=0.9)
    first, again = (edgeattn.generate(folder, prompts, seed=7, **options) for _ in range(2))
    assert first == again
    assert first != edgeattn.generate(folder, prompts, seed=8, **options)
    assert edgeattn.generate(folder, prompts, seed=7, top_k=1, **options) == greedy
    stop = references[0][0][2]  # row 0's third token
    seen: dict = {}
    rows = edgeattn.generate(
        folder,
        prompts,
        NEW_TOKENS,
        "ort-cpu",
        stop_tokens=[stop],
        on_token=lambda b, t: seen.setdefault(b, []).append(t),
    )
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        want = greedy[b][len(prompt) :]
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert row == prompt + want[:cut] and seen[b] == want[:cut], b


def sinks_reference(model, prompt, sinks):
    """Greedy tokens and the logits they were chosen from, with every sliding layer also seeing the first ``sinks``
    positions (StreamingLLM): transformers' eager model over the whole sequence, given that mask as a 4-D one."""
    sequence, steps = list(prompt), []
    for _ in range(NEW_TOKENS):
        q = torch.arange(len(sequence))[:, None]
        k = torch.arange(len(sequence))[None]
        allowed = (k <= q) & ((q - k < WINDOW) | (k < sinks))
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            steps.append(model(torch.tensor([sequence]), attention_mask=mask).logits[0, -1].numpy())
        sequence.append(int(steps[-1].argmax()))
    return sequence[len(prompt) :], steps


def test_attention_sinks_keep_the_first_positions(tmp_path):
    """sinks=4 on Mistral (window 8): each sliding layer's ring is 4 + 8 slots and every query also sees positions
    0-3, as the reference with that mask computes; without the sinks the logits differ."""
    model = build("mistral")
    folder = export_lm(model, tmp_path, chunk=CHUNK, max_cache_len=CACHE, sinks=4)
    assert [layer["slots"] for layer in lmloop.read_config(folder)["layers"]] == [12, 12]
    prefill_log, decode_log = [], []
    runs = [
        recorded(edgeattn.load(folder / f"{p}.onnx", "ort-cpu", accuracy=True).run, log)
        for p, log in (("prefill", prefill_log), ("decode", decode_log))
    ]
    got = lmloop.generate(*runs, lmloop.read_config(folder), PROMPTS, NEW_TOKENS)
    for b, (prompt, row, steps) in enumerate(zip(PROMPTS, got, steps_of(prefill_log, decode_log, PROMPTS))):
        want_tokens, want_steps = sinks_reference(model, prompt, 4)
        assert_steps_match(row[len(prompt) :], steps, want_tokens, want_steps, 1e-4, f"row {b}")
    plain_tokens, plain_steps = reference_generation(model, PROMPTS[0])
    assert np.abs(np.array(plain_steps) - np.array(sinks_reference(model, PROMPTS[0], 4)[1])).max() > 1e-3


def test_a_fixed_batch_takes_the_prompts_in_groups(tmp_path):
    """batch=2: static shapes everywhere; three prompts go as two groups, the last filled and the filler dropped."""
    model = build("mistral")
    folder = export_lm(model, tmp_path, chunk=CHUNK, max_cache_len=CACHE, batch=2)
    shape = onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [2, 1]
    got = edgeattn.generate(folder, PROMPTS, 8, "ort-cpu")
    assert [row[len(p) :] for p, row in zip(PROMPTS, got)] == [reference_generation(model, p)[0][:8] for p in PROMPTS]


def test_softcapping_is_applied():
    """Gemma 2 soft-caps its scores: the edgeattn model follows eager with the cap, and the cap changes the logits
    (so the parity tests above would catch it being dropped)."""
    prompt = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    capped = build("gemma2")
    with torch.no_grad():  # random init scores are ~1e-2: scale them up so a cap of 1 changes them
        for name, weight in capped.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(20)
    uncapped = build("gemma2", state=capped.state_dict(), softcap=None)
    ours = build("gemma2", "edgeattn", capped.state_dict())
    torch.testing.assert_close(logits(ours, prompt), logits(capped, prompt), atol=1e-5, rtol=0)
    assert (logits(uncapped, prompt) - logits(capped, prompt)).abs().max() > 1e-3


def test_bad_inputs_get_one_clear_error():
    model = build("llama")
    with pytest.raises(EdgeAttnError, match="input_ids, an integer tensor"):
        edgeattn.convert(model, torch.zeros((1, 8)))
    with pytest.raises(InvalidArgument, match="0 < chunk <= max_cache_len"):
        export_lm(model, "unused", chunk=32, max_cache_len=16)
    with pytest.raises(InvalidArgument, match="caches must be"):
        export_lm(model, "unused", caches="ring")
    with pytest.raises(InvalidArgument, match="export_lm exports transformers causal LMs"):
        export_lm(torch.nn.Linear(2, 2), "unused")
    # a layer's attention gets its mask and position embeddings from the model: the model is what converts
    hidden = torch.randn(1, 8, TINY["hidden_size"])
    for part, who in ((model.model.layers[0].self_attn, "it"), (model.model.layers[0], "its LlamaAttention")):
        with pytest.raises(InvalidArgument) as info:
            edgeattn.convert(part, hidden)
        message = str(info.value)
        assert message.startswith(f"{type(part).__name__} is part of a transformers model: {who} gets")
        assert "convert that model instead" in message and "\n" not in message


@pytest.mark.parametrize("lm", [LM["llama"]], indirect=True)
def test_generate_refuses_bad_input_in_one_line(lm, tmp_path):
    folder = lm[3]
    cases = [
        ((tmp_path, [[1]]), "is not a folder written by export_lm"),
        ((folder, [1, 2, 3]), "prompt 0 must be a non-empty list of token ids in [0, 128)"),
        ((folder, [[1], []]), "prompt 1 must be"),
        ((folder, [[1, 999]]), "prompt 0 must be"),
        ((folder, [[1]], 0), "max_new_tokens must be a positive integer"),
        ((folder, [[1] * 40], 20), "do not fit the global layers' cache of 48 positions"),
    ]
    for args, message in cases:
        with pytest.raises(EdgeAttnError) as info:
            edgeattn.generate(*args)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(InvalidArgument, match="0 < top_p <= 1"):
        edgeattn.generate(folder, [[1]], top_p=0)


def test_import_leaves_transformers_and_the_import_system_alone():
    """import edgeattn neither imports transformers nor touches the import machinery; register() (which convert
    calls) adds the implementation to both of transformers' interfaces."""
    code = (
        "import sys; finders = list(sys.meta_path); import edgeattn; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert sys.meta_path == finders, 'import hooks installed'; "
        "from edgeattn.convert import hf_lm; hf_lm.register(); "
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A; "
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M; "
        "assert 'edgeattn' in A and 'edgeattn' in M, 'not registered'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert done.returncode == 0, done.stderr[-2000:]
