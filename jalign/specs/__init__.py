"""The algorithm registry: one spec per algorithm, looked up by ``config.algorithm``.

Each spec (``jalign.specs.<name>``) declares its config blocks and their validation, the data it reads
and the rows it trains on, its loss and reference, and for rollout algorithms how they sample. The
config, the recipes and the planner ask the registry; nothing else compares algorithm names.
"""

from __future__ import annotations

from jalign.specs import dpo, grpo, kd, kto, ppo, reinforce, rm, rs, sft, spin, steerlm2
from jalign.specs.base import AlgorithmSpec, ConfigError, RolloutSettings, RolloutSpec

REGISTRY: dict[str, AlgorithmSpec] = {s.name: s for s in (
    sft.SPEC, rm.SPEC, dpo.SPEC, kto.SPEC, kd.SPEC, steerlm2.SPEC, spin.SPEC, reinforce.SPEC, rs.SPEC, ppo.SPEC, grpo.SPEC)}
ALGORITHMS = tuple(REGISTRY)


def get(name: str) -> AlgorithmSpec:
  """The spec of algorithm ``name``; an unknown name is a ``ConfigError`` on ``config.algorithm``."""
  if name not in REGISTRY:
    raise ConfigError(f"config.algorithm: {name!r} is not one of {ALGORITHMS}")
  return REGISTRY[name]


def sampling_settings(c) -> RolloutSettings:
  """How the algorithm of config ``c`` samples from its policy."""
  spec = get(c.algorithm)
  if spec.sampling is None:
    raise ConfigError(f"config.algorithm: {c.algorithm} trains on a data file; it generates nothing")
  return spec.sampling(c)


__all__ = ["ALGORITHMS", "AlgorithmSpec", "ConfigError", "REGISTRY", "RolloutSettings", "RolloutSpec", "get",
           "sampling_settings"]
