"""Reference models, registered by name so the CLI can build, export and re-check them (see :mod:`.registry`).

A model is rebuilt exactly from (name, config, seed): weights are initialised under ``torch.manual_seed(seed)``
and example inputs are drawn from a generator seeded with the same seed.
"""

from . import (
    bench_blocks,
    dit,
    mask2former,
    moba,
    nat,
    ppma,
    probes,
    rmt,
    segment_lm,
    swin,
    user,
)  # each registers its models
from .registry import REGISTRY, BuiltModel, ModelSpec, build, example_inputs, from_metadata, names, register

__all__ = [
    "REGISTRY",
    "BuiltModel",
    "ModelSpec",
    "build",
    "example_inputs",
    "from_metadata",
    "names",
    "register",
    "bench_blocks",
    "dit",
    "mask2former",
    "moba",
    "nat",
    "ppma",
    "probes",
    "rmt",
    "segment_lm",
    "swin",
    "user",
]
