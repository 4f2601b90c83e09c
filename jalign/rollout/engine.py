"""Rollout engines: where a rollout's samples come from, and how they get the trainer's weights; the
local engine.

Every engine answers the same three calls:
  ``update_weights(version, weights)``  the trainer's ``(params, rest)`` after step ``version``; a call
                                        with the version the engine has does nothing
  ``generate(prompts, request)``        ``Samples`` of the weights last given, with their version
  ``release()``                         lets go of the engine's copy of the weights until the next update

``LocalEngine`` (``rollout.engine="local"``, here): the JAX decode loop in the trainer's own process,
on a copy of the weights laid out for generation (LoRA folded in, cast to the compute dtype, sharded by
the generation rules) that one compiled copy refits. ``ServedEngine`` (``"served"``,
``jalign.serve.engine``): the same decode loop in a generation server job of its own (``python -m
jalign.serve --config.generation.serve=True``); each update makes the local copy, offers it through a
transfer server and has the server pull it bucket by bucket (``jalign.rollout.refit``). Both sample
with ``jalign.rollout.sampling.sample``, so for the same weights and request they give the same tokens.
``jalign.recipes.rollouts.ENGINES`` maps ``config.rollout.engine`` to them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models import lora
from jalign.parallel import mesh as pmesh
from jalign.rollout.sampling import Request, Samples, sample


def generation_rules(settings, rules):
  """The rules of the generation copy of the weights: the sampling ``settings``', or by default the
  training ``rules`` sharded over tensor only."""
  return (settings.generation_rules if settings is not None else ()) or pmesh.inference_rules(rules)


def generation_copy(c, graphdef, weights, mesh, rules):
  """The refit: ``(graphdef, jitted copy)``. The copy takes weights like ``weights`` (the trainer's
  parameters and the rest of model ``graphdef``) to the state of their generation copy, the model of
  the returned graphdef: LoRA adapters folded into their kernels, cast to ``model.dtype``, laid out by
  the generation ``rules``, in one compiled copy, shard to shard."""
  dtype = jnp.dtype(c.model.dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731

  def plain(w):
    model = nnx.merge(graphdef, *w, copy=True)
    return lora.merge_lora(model) if lora.has_lora(model) else model

  copy = lambda w: jax.tree.map(cast, nnx.state(plain(w)))  # noqa: E731
  shardings = pmesh.tree_shardings(jax.eval_shape(copy, weights), mesh, rules)
  return nnx.graphdef(nnx.eval_shape(lambda: plain(weights))), jax.jit(copy, out_shardings=shardings)


class LocalEngine:
  """The decode loop in this process. With a ``mesh``, on the generation copy of the weights (laid out by
  ``gen_rules``), refitted when the version changes; without one, on the trainer's weights as they are."""

  def __init__(self, c, graphdef, mesh, rules, gen_rules, log=print):
    self.c, self.graphdef, self.mesh, self.rules, self.gen_rules = c, graphdef, mesh, rules, gen_rules
    self.model, self.version = None, None
    self.refit_seconds = None  # the last refit's, compile excluded
    self._copy = None  # (graphdef, the compiled copy)

  def update_weights(self, version: int, weights) -> None:
    if self.model is not None and self.version == version:
      return
    self.model = None  # its memory goes before the refit takes more
    began = time.perf_counter()
    if self.mesh is None:
      self.model = nnx.merge(self.graphdef, *weights, copy=True)
    else:
      first = self._copy is None
      if first:
        self._copy = generation_copy(self.c, self.graphdef, weights, self.mesh, self.gen_rules)
      graphdef, copy = self._copy
      self.model = nnx.merge(graphdef, jax.block_until_ready(copy(weights)))
      self.refit_seconds = None if first else time.perf_counter() - began
    self.version = version

  def generate(self, prompts, request: Request) -> Samples:
    return Samples(*sample(self.model, prompts, request, self.mesh, self.gen_rules or self.rules), self.version)

  def release(self) -> None:
    self.model, self.version = None, None
