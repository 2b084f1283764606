import pytest
import torch

from edgeattn import EdgeAttnError, models
from edgeattn.layers import MaskTable


@pytest.mark.parametrize("name", models.names())
def test_registered_model_builds_runs_and_rebuilds_identically(name):
    a, b = models.build(name, seed=3), models.build(name, seed=3)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    with torch.no_grad():
        out = a.module(**a.inputs)
    assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(out))
    assert not torch.equal(models.build(name, seed=4).inputs[next(iter(a.inputs))], a.inputs[next(iter(a.inputs))])


def test_nat_tiny_uses_neighborhood_and_dilation():
    built = models.build("nat-tiny")
    names = [m.mask.name for m in built.module.modules() if isinstance(m, MaskTable)]
    assert names == ["neighborhood_k7"] * 2 + ["neighborhood_k7_d2"] * 2
    assert built.module(**built.inputs).shape == (1, 10)


def test_swin_block_alternates_shift():
    built = models.build("swin-tiny-block")
    assert [blk.attn.mask.name for blk in built.module.blocks] == ["window_7", "window_7_shift3"]


def test_unknown_model_and_config_are_clear_errors():
    with pytest.raises(EdgeAttnError, match="unknown model 'resnet'; choose one of"):
        models.build("resnet")
    with pytest.raises(EdgeAttnError, match=r"no config keys \['depthz'\]"):
        models.build("nat-tiny", depthz=3)


# Small configurations for the state tests below; models not listed are small enough as registered.
SMALL = {
    "causal-block": dict(seq_len=128),
    "dinat-mini": dict(image_size=64, embed_dim=16, depths=[2, 2], heads=[2, 2], kernel=3, dilations=[[1, 2], [1, 2]]),
    "mask2former-decoder": dict(
        image_size=64,
        in_channels=24,
        hidden_dim=32,
        heads=4,
        dim_feedforward=48,
        num_queries=6,
        dec_layers=3,
        mask_dim=16,
        num_classes=5,
    ),
    "nat-mini": dict(image_size=64, embed_dim=16, depths=[2, 2], heads=[2, 2], kernel=3),
    "nat-tiny": dict(image_size=64, kernel=3),
    "ppma-t": dict(image_size=48, embed_dims=[16] * 4, depths=[1] * 4, num_heads=[2] * 4),
    "radial-block": dict(frames=4),
    "rmt-t": dict(image_size=48, embed_dims=[16] * 4, depths=[1] * 4, heads=[2] * 4),  # every stage's grid > 1x1
    "segment-lm": dict(vocab=64, dim=32, layers=2, segments=[4, 4], window=4, max_cache=16),
    "segment-lm-decode": dict(vocab=64, dim=32, layers=2, segments=[4, 4], window=4, max_cache=16),
    "swin-t": dict(image_size=64, embed_dim=16, depths=[2, 2, 2, 2], heads=[1, 1, 2, 2], window_size=4),
}


def _outputs(module, inputs):
    return torch.utils._pytree.tree_leaves(module(**inputs))


@pytest.mark.parametrize("name", models.names())
def test_every_saved_buffer_is_used_as_loaded(name):
    # A saved buffer something was precomputed from at construction would load and then be ignored: a checkpoint
    # whose values differ from the formula's would silently give other outputs than the reference.  So each
    # floating-point buffer in the state dict, perturbed and loaded strictly into a fresh model, must change the
    # outputs, or the load must be refused with an error naming the key.
    built = models.build(name, **SMALL.get(name, {}))
    fresh = models.build(name, **SMALL.get(name, {})).module
    state, parameters = built.module.state_dict(), dict(built.module.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = _outputs(built.module, built.inputs)
        for key, value in state.items():
            if key in parameters or not value.is_floating_point():
                continue
            # scaled, and shifted down by a little: keeps log-decays negative and BatchNorm variances positive
            changed = value * 1.5 - 0.01 * torch.rand(value.shape, generator=generator)
            try:
                fresh.load_state_dict({**state, key: changed}, strict=True)
            except RuntimeError as error:
                assert key in str(error), f"{key}: loading a perturbed value failed without naming it: {error}"
                fresh.load_state_dict(state, strict=True)  # and the refused value was not kept
                continue
            after = _outputs(fresh, built.inputs)
            assert any(not torch.equal(a, b) for a, b in zip(before, after)), (
                f"{name}: {key} was loaded with other values but the outputs did not change"
            )


@pytest.mark.parametrize("name", models.names())
def test_every_parameter_is_read_by_forward(name):
    # Loading copies into the parameters in place, so a forward that reads a parameter sees the loaded values; one
    # that reaches it only through something precomputed at construction would not (and could not train it).
    built = models.build(name, **SMALL.get(name, {}))
    sum(t.sum() for t in _outputs(built.module, built.inputs) if t.is_floating_point()).backward()
    unread = [k for k, p in built.module.named_parameters() if p.grad is None]
    assert not unread, f"{name}: forward does not read {unread}"
