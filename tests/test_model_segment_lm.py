"""segment-lm: the prefill graph (static segment + sinks/window table) and the decode-step graph (static KV cache,
mask computed in the graph from `position`), in torch and on onnxruntime / OpenVINO."""

import subprocess
import sys

import pytest
import torch

import edgeattn
from edgeattn import models, parity
from edgeattn.models.segment_lm import greedy, torch_step
from edgeattn.registered import export_registered

from conftest import CPU_RUNTIMES, require

STEPS = 24


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segment-lm")
    return {name: export_registered(name, folder / f"{name}.onnx").path for name in ("segment-lm", "segment-lm-decode")}


@pytest.fixture(scope="module")
def lm():
    return models.build("segment-lm"), models.build("segment-lm-decode")


def recompute(prompt, generated, **config):
    """The full recomputation without a cache: the generated tokens as one-token segments after the prompt's."""
    segments = models.REGISTRY["segment-lm"].config["segments"] + [1] * len(generated)
    full = models.build("segment-lm", segments=segments, **config)
    ids = torch.cat([prompt, torch.tensor([generated])], dim=1)
    with torch.no_grad():
        return full.module(ids)


def test_prefill_mask_is_segments_within_window_plus_sinks(lm):
    prefill = lm[0].module
    ids, n_sink, window = prefill.segment_ids.tolist(), prefill.n_sink, prefill.window
    T = len(ids)
    table = edgeattn.materialize(prefill.mask_table.mask, q_len=T)[0]
    for q in range(T):
        for k in range(T):
            segment_rule = ids[k] == ids[q] or (ids[k] < ids[q] and k <= q)
            expected = segment_rule and (k < n_sink or abs(q - k) <= window)
            assert table[q, k].item() == expected, (q, k)
    # bidirectional inside a segment: the first token of segment 1 sees the next ones, not segment 2
    first = ids.index(1)
    assert table[first, first + 1] and not table[first, ids.index(2)]


def test_prefill_cache_layout_and_shared_weights(lm):
    prefill, decode = lm
    logits, key, value = prefill.module(**prefill.inputs)
    T, config = prefill.module.prompt_len, prefill.config
    head_dim = config["dim"] // config["heads"]
    assert logits.shape == (1, T, config["vocab"])
    assert key.shape == value.shape == (config["layers"], 1, config["kv_heads"], config["max_cache"], head_dim)
    assert (key[:, :, :, T:] == 0).all() and (value[:, :, :, T:] == 0).all() and (key[:, :, :, :T] != 0).any()
    a, b = prefill.module.state_dict(), decode.module.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the decode example continues the real prefill of the same prompt
    assert torch.equal(decode.inputs["past_key"], key) and torch.equal(decode.inputs["past_value"], value)
    assert decode.inputs["position"].tolist() == [T]


# the default (GQA 4/2 heads, untied head) and plain multi-head attention with a tied head
@pytest.mark.parametrize("config", [{}, {"kv_heads": 4, "tie_embeddings": True}])
def test_decode_after_prefill_equals_full_recomputation(config):
    prefill, decode = models.build("segment-lm", **config), models.build("segment-lm-decode", **config)
    prompt = prefill.inputs["input_ids"]
    T = prompt.shape[1]
    tokens, step_logits = [], []
    with torch.no_grad():
        logits, key, value = prefill.module(prompt)
        prompt_logits = logits
        tokens.append(int(logits[0, -1].argmax()))
        for i in range(STEPS):  # past the window (24) and its sinks: the mask evicts the middle of the prompt
            logits, key, value = decode.module(torch.tensor([[tokens[-1]]]), torch.tensor([T + i]), key, value)
            step_logits.append(logits[0, 0])
            tokens.append(int(logits[0, 0].argmax()))
    full_logits, full_key, full_value = recompute(prompt, tokens[:STEPS], **config)
    # same values up to float32 summation order (the decode sums over 128 cache slots, the recompute over 88 keys)
    torch.testing.assert_close(full_logits[0, :T], prompt_logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full_logits[0, T:], torch.stack(step_logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(full_key, key, atol=1e-5, rtol=0)
    torch.testing.assert_close(full_value, value, atol=1e-5, rtol=0)
    assert full_logits[0, T - 1 :].argmax(-1).tolist() == tokens
    # the window evicts: without it (window 128) the same tokens get other logits
    unwindowed = recompute(prompt, tokens[:STEPS], **{**config, "window": 128})[0]
    assert (unwindowed[0, T:] - full_logits[0, T:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["segment-lm", "segment-lm-decode"])
def test_export_parity(files, name):
    results = parity.check_file(files[name], CPU_RUNTIMES, runs=1)
    assert all(r.ok and r.max_abs_err <= 1e-4 for r in results), parity.format_table(results)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_greedy_generation_on_runtime_matches_torch(files, lm, runtime):
    require(runtime)
    prefill, decode = lm
    prompt = prefill.inputs["input_ids"].numpy()
    expected = greedy(torch_step(prefill.module), torch_step(decode.module), prompt, STEPS)
    sessions = [edgeattn.load(files[name], runtime=runtime) for name in ("segment-lm", "segment-lm-decode")]
    assert greedy(sessions[0].run, sessions[1].run, prompt, STEPS) == expected
    assert len(set(expected)) > 1  # a real sequence, not one token repeated


def test_cli_export_check_exits_0(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeattn",
            "export",
            "segment-lm-decode",
            "-o",
            str(tmp_path / "decode.onnx"),
            "--check",
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "decode_sinks_s4_w24" in proc.stdout


def test_bad_inputs_are_clear_errors(lm):
    prefill, decode = lm
    feeds = dict(decode.inputs)
    with pytest.raises(ValueError, match=r"position must be in \[0, 128\)"):
        decode.module(**{**feeds, "position": torch.tensor([128])})
    with pytest.raises(ValueError, match="past_key must be"):
        decode.module(**{**feeds, "past_key": feeds["past_key"][:, :, :, :64]})
    with pytest.raises(ValueError, match="one token per step"):
        decode.module(**{**feeds, "input_ids": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, 64\)"):
        prefill.module(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[0, 512\)"):
        prefill.module(torch.full((1, 64), 512))
    with pytest.raises(ValueError, match="must be int64"):
        prefill.module(torch.zeros(1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=4"):
        models.build("segment-lm", kv_heads=3)
    with pytest.raises(ValueError, match="does not fit the cache"):
        models.build("segment-lm", segments=[100, 100])
    with pytest.raises(ValueError, match="segments must be a non-empty list"):
        models.build("segment-lm", segments=[])
