"""Rollouts: generation with the JAX engine (and, later, exported engines)."""

from jalign.rollout.generate import Rollout, filter_logits, generate

__all__ = ["Rollout", "filter_logits", "generate"]
