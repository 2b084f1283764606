"""transformers causal LMs on edgeattn's "edgeattn" attention implementation, against transformers' eager model.

Tiny random models (weights cannot be downloaded; the code path is what is tested): 2 layers, 4 query heads on 2
key/value heads, a 32-token prompt and a sliding window of 8 where the architecture has one, so windows bite.  Each
model is exported once (prefill + static-cache decode step) and its files are checked on onnxruntime and OpenVINO.
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
from edgeattn import EdgeAttnError, runtimes
from edgeattn.convert import hf_lm
from edgeattn.errors import InvalidArgument
from edgeattn.export import export_lm

transformers = pytest.importorskip("transformers")

from conftest import CPU_RUNTIMES, require  # noqa: E402

PROMPT, CACHE, NEW_TOKENS, WINDOW = 32, 48, 8, 8
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
PLAIN = Path(__file__).with_name("plain_generate.py")


def build(name: str, attn: str = "eager", state=None, **config):
    if attn == "edgeattn":
        hf_lm.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation=attn).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request, tmp_path_factory):
    """(name, eager model, prompt, folder with prefill.onnx and decode.onnx)."""
    name = request.param
    model = build(name)
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp(name)
    export_lm(model, PROMPT, CACHE, folder)
    return name, model, prompt, folder


def test_edgeattn_logits_match_eager(lm):
    name, model, prompt, _ = lm
    want = logits(model, prompt)
    direct = build(name, "edgeattn", model.state_dict())  # attn_implementation="edgeattn", dense masks
    converted, lines = edgeattn.convert(model, prompt, report=True)  # static tables for the prompt length
    torch.testing.assert_close(logits(direct, prompt), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(converted, prompt), want, atol=1e-5, rtol=0)
    kinds = {
        "mistral": ["sliding_window_8"] * 2,
        "gemma3": ["sliding_window_8", "causal"],
        "gemma2": ["sliding_window_8", "causal"],
    }.get(name, ["causal"] * 2)
    assert [line.split(" -> edgeattn ")[1].split(" (")[0] for line in lines] == kinds, lines
    assert lines[0].startswith("model.layers.0.self_attn: transformers ") and f"({PROMPT} tokens, " in lines[0]
    assert model.config._attn_implementation == "eager"  # the original is untouched


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_prefill_file_matches_eager(lm, runtime):
    require(runtime)
    _, model, prompt, folder = lm
    got = edgeattn.load(folder / "prefill.onnx", runtime).run({"input_ids": prompt.numpy()})["logits"]
    atol = runtimes.get(runtime).tolerance("fp32").atol
    np.testing.assert_allclose(got, logits(model, prompt).numpy(), atol=atol, rtol=0)


def greedy(session, decode, prompt):
    """Greedy tokens from an edgeattn Session of prefill.onnx and one of decode.onnx, and the logits each token was
    chosen from (1, vocab): the prefill's last position, then each decode step's."""
    out = session.run({"input_ids": prompt.numpy()})
    steps = [out["logits"][:, -1]]
    tokens = [int(steps[-1][0].argmax())]
    for step in range(NEW_TOKENS - 1):
        feeds = {"input_ids": np.array([[tokens[-1]]]), "cache_position": np.array([PROMPT + step])}
        feeds.update({k.replace("present", "past_key_values"): v for k, v in out.items() if k != "logits"})
        out = decode.run(feeds)
        steps.append(out["logits"][:, -1])
        tokens.append(int(steps[-1][0].argmax()))
    return tokens, steps


def reference_generation(model, prompt):
    """transformers' greedy ``generate``: the new tokens and its logits at each step (raw, (1, vocab) each)."""
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences[0, PROMPT:].tolist(), [step.numpy() for step in out.logits]


def reference_tokens(model, prompt):
    return reference_generation(model, prompt)[0]


def assert_steps_match(tokens, steps, want_tokens, want_steps, atol, label):
    """Every step's logits within ``atol`` of transformers' (while the tokens fed so far agree), then the tokens."""
    assert len(steps) == len(want_steps) == NEW_TOKENS, label
    for step, (got, want) in enumerate(zip(steps, want_steps)):
        if tokens[:step] != want_tokens[:step]:
            break  # this step was fed another token: the token comparison below reports it
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"{label}: logits of step {step}")
    assert tokens == want_tokens, label


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_greedy_generation_matches_generate(lm, runtime):
    """The prefill's and every decode step's logits within the runtime's fp32 tolerance of transformers' own in
    ``generate``, and the same greedy tokens."""
    require(runtime)
    _, model, prompt, folder = lm
    sessions = [edgeattn.load(folder / f"{part}.onnx", runtime) for part in ("prefill", "decode")]
    atol = runtimes.get(runtime).tolerance("fp32").atol
    assert_steps_match(*greedy(*sessions, prompt), *reference_generation(model, prompt), atol, runtime)


@pytest.mark.parametrize("lm", SLIDING, indirect=True)  # the architectures with a sliding window (not a skip)
def test_sliding_window_is_in_the_file(lm):
    """The prompt is 4 windows long: full causal attention would give other logits, the file gives eager's, and
    its metadata names the sliding-window table."""
    name, model, prompt, folder = lm
    full = build(name, state=model.state_dict(), window=4 * PROMPT)  # same weights, window beyond the prompt
    want = logits(model, prompt).numpy()
    assert np.abs(logits(full, prompt).numpy() - want).max() > 1e-2
    got = edgeattn.load(folder / "prefill.onnx", "ort-cpu").run({"input_ids": prompt.numpy()})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(folder / "prefill.onnx"), load_external_data=False).metadata_props}
    assert f"sliding_window_{WINDOW}" in {m["mask"] for m in json.loads(props["edgeattn.masks"])}


# one model is enough here: local and global layers, GQA, query_pre_attn_scalar
@pytest.mark.parametrize("lm", ["gemma3"], indirect=True)
def test_plain_runtimes_generate_without_edgeattn(lm, tmp_path):
    """A deployment's view: plain onnxruntime and plain OpenVINO, in a process that cannot import edgeattn."""
    name, model, prompt, folder = lm
    np.save(tmp_path / "prompt.npy", prompt.numpy())
    done = subprocess.run(
        [
            sys.executable,
            str(PLAIN),
            str(folder),
            str(tmp_path / "prompt.npy"),
            str(NEW_TOKENS),
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    (want_tokens, want_steps), want_logits = reference_generation(model, prompt), logits(model, prompt).numpy()
    for runtime, result in results.items():
        assert_steps_match(result["tokens"], list(np.load(result["steps"])), want_tokens, want_steps, 1e-4, runtime)
        np.testing.assert_allclose(np.load(result["logits"]), want_logits, atol=1e-4, rtol=0, err_msg=runtime)


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
    with pytest.raises(EdgeAttnError, match="0 < prompt_len < max_cache_len"):
        export_lm(model, 32, 16, "unused")
    # a layer's attention gets its mask and position embeddings from the model: the model is what converts
    hidden = torch.randn(1, 8, TINY["hidden_size"])
    for part, who in ((model.model.layers[0].self_attn, "it"), (model.model.layers[0], "its LlamaAttention")):
        with pytest.raises(InvalidArgument) as info:
            edgeattn.convert(part, hidden)
        message = str(info.value)
        assert message.startswith(f"{type(part).__name__} is part of a transformers model: {who} gets")
        assert "convert that model instead" in message and "\n" not in message


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
