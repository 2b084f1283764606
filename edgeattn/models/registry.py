"""The registry of reference models: each model module registers itself by name so the CLI can build, export and
re-check it.

A model is rebuilt exactly from (name, config, seed): weights are initialised under ``torch.manual_seed(seed)``
and example inputs are drawn from a generator seeded with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import BadFile, EdgeAttnError, InvalidArgument
from . import user


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    make: Callable[..., torch.nn.Module]  # config -> module
    # config -> input name -> a shape (float32 normal noise) or a function of a torch.Generator returning the tensor
    inputs: Callable[..., dict[str, object]]
    outputs: tuple[str, ...]  # output names in the exported file
    config: dict = field(default_factory=dict)
    batch_axes: dict = field(default_factory=dict)  # input name -> its batch axis (None: none); default 0
    listed: bool = True  # in `edgeattn models` (conformance probes are not: see edgeattn.models.probes)


@dataclass
class BuiltModel:
    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    config: dict
    seed: int
    batch_axes: dict = field(default_factory=dict)
    # a user's model: the module edgeattn.convert made of ``module`` (which stays the PyTorch reference)
    converted: Optional[torch.nn.Module] = None

    @property
    def exported(self) -> torch.nn.Module:
        """The module to export: the converted one for a user's model, else the model itself."""
        return self.module if self.converted is None else self.converted


REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str,
    description: str,
    inputs: Callable[..., dict[str, object]],
    outputs=("output",),
    batch_axes: Optional[dict] = None,
    listed: bool = True,
    **config,
):
    def decorate(make):
        spec = ModelSpec(name, description, make, inputs, tuple(outputs), config, dict(batch_axes or {}), listed)
        REGISTRY[name] = spec
        return make

    return decorate


def names() -> list[str]:
    """The reference models (``edgeattn models``), without the conformance probes."""
    return sorted(name for name, spec in REGISTRY.items() if spec.listed)


def build(name: str, seed: int = 0, **overrides) -> BuiltModel:
    """The registered model ``name`` (config ``overrides``), or a user's model ``module:callable`` with
    ``inputs={name: "SHAPE[:DTYPE]"}`` (see :mod:`.user`), weights and inputs drawn from ``seed``."""
    if user.is_spec(name):
        return _build_user(name, seed, **overrides)
    if name not in REGISTRY:
        raise InvalidArgument(f"unknown model {name!r}; choose one of: {', '.join(names())} (see `edgeattn models`)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be an integer in [0, 2**63), got {seed!r}")
    spec = REGISTRY[name]
    unknown = set(overrides) - set(spec.config)
    if unknown:
        raise InvalidArgument(f"model {name} has no config keys {sorted(unknown)}; it takes {sorted(spec.config)}")
    config = {**spec.config, **overrides}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = spec.make(**config).eval()
    return BuiltModel(name, module, example_inputs(name, seed, **config), spec.outputs, config, seed, spec.batch_axes)


def _build_user(spec: str, seed: int, inputs=None, **unknown) -> BuiltModel:
    if unknown:
        raise InvalidArgument(f"a model of your own takes no config keys, got {sorted(unknown)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be an integer in [0, 2**63), got {seed!r}")
    specs = user.parse_inputs(f"{k}={v}" for k, v in (inputs or {}).items())
    tensors = user.example_inputs(specs, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module, converted = user.build_module(spec, tensors)
    return BuiltModel(spec, module, tensors, (), {"inputs": specs}, seed, converted=converted)


def example_inputs(name: str, seed: int = 0, **config) -> dict[str, torch.Tensor]:
    """The registered model's example inputs for ``seed`` (without building the model)."""
    spec = REGISTRY[name]
    generator = torch.Generator().manual_seed(seed)
    return {
        k: make(generator) if callable(make) else torch.randn(make, generator=generator)
        for k, make in spec.inputs(**{**spec.config, **config}).items()
    }


def from_metadata(meta: dict, path, trust_code: bool = False) -> BuiltModel:
    """Rebuild the registered model an exported file (at ``path``) came from, using its ``edgeattn.*`` metadata.
    A user's model (``module:callable``) runs the user's code: only with ``trust_code=True``."""
    if "model" not in meta:
        raise BadFile(
            f"{path}: has no edgeattn reference-model metadata (it was not exported by `edgeattn "
            f"export`), so there is no torch model to rebuild; `edgeattn check` compares its "
            f"runtimes with each other, edgeattn.parity.compare_model with its module from Python"
        )
    if user.is_spec(meta["model"]) and not trust_code:
        raise EdgeAttnError(
            f"{path}: was exported from your model {meta['model']}; rebuilding it runs that code, "
            f"so pass --trust-code (trust_code=True) to compare with it"
        )
    return build(meta["model"], seed=int(meta.get("seed", 0)), **meta.get("config", {}))
