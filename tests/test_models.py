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
