"""Rollout engines: where a rollout's samples come from, and how they get the trainer's weights.

Every engine answers the same three calls:
  ``update_weights(version, weights)``  the trainer's ``(params, rest)`` after step ``version``; a call
                                        with the version the engine has does nothing
  ``generate(prompts, request)``        ``Samples`` of the weights last given, with their version
  ``release()``                         lets go of the engine's copy of the weights until the next update

``LocalEngine`` (``rollout.engine="local"``): the JAX decode loop in the trainer's own process, on a
copy of the weights laid out for generation (LoRA folded in, cast to the compute dtype, sharded by the
generation rules) that one compiled copy refits. ``ServedEngine`` (``"served"``): the same decode loop
in a generation server job of its own (``python -m jalign.serve --config.generation.serve=True``); each
update makes the local copy, offers it through a transfer server and has the server pull it bucket by
bucket (``jalign.rollout.refit``). Both sample with ``jalign.rollout.sampling.sample``, so for the
same weights and request they give the same tokens. ``ENGINES`` maps ``config.rollout.engine`` to them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models import lora
from jalign.parallel import mesh as pmesh
from jalign.rollout import refit
from jalign.rollout.sampling import Request, Samples, sample
from jalign.serve.generation import RemoteGenerator
from jalign.serve.triton import ServeError, ServerGone
from jalign.specs.base import ConfigError
from jalign.trainer import TrainingError


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


class ServedEngine:
  """The decode loop of the generation server at ``config.rollout.engine_server``, refitted through a
  transfer server in this process whenever the trainer's weights change. The server's mesh and
  generation rules must be the actor's (the copy moves shard to shard)."""

  def __init__(self, c, graphdef, mesh, rules, gen_rules, log=print):
    if jax.process_count() > 1:
      raise ConfigError("config.rollout.engine: a served engine is refitted from an actor of one process; this "
                        f"job has {jax.process_count()}")
    address = c.rollout.engine_server
    if not address:
      raise ConfigError("config.rollout.engine_server: the served engine needs the generation server's host:port")
    self.local = LocalEngine(c, graphdef, mesh, rules, gen_rules)  # makes the copy that is offered
    log(f"waiting up to {c.rollout.connect_timeout_s:.0f} s for the generation server at {address} "
        "(config.rollout.engine_server)")
    try:
      self.client = RemoteGenerator(address, connect_timeout_s=c.rollout.connect_timeout_s)
    except ConfigError as e:
      raise ConfigError(f"config.rollout.engine_server: {e}") from None
    self.offer = refit.Offer(address)
    self.bucket_bytes = int(c.rollout.refit_bucket_mb * 2**20)
    self.refit_timeout_s = float(c.rollout.refit_timeout_s)
    self.version = None
    self.refit_seconds = None  # the last refit's: copy, offer and the server's pulls

  def update_weights(self, version: int, weights) -> None:
    if self.version == version:
      return
    began = time.perf_counter()
    self.local.update_weights(version, weights)
    manifest = self.offer.offer(nnx.state(self.local.model), version, self.bucket_bytes)
    self.local.release()  # the transfer server holds the arrays until they are pulled
    answer = self._call(self.client.refit, manifest, timeout_s=self.refit_timeout_s)
    if answer["version"] != version:
      raise TrainingError(f"generation server {self.client.url} serves version {answer['version']} after a refit "
                          f"to {version}")
    self.version = version
    self.refit_seconds = time.perf_counter() - began

  def generate(self, prompts, request: Request) -> Samples:
    samples = self._call(self.client.rollout, prompts, request)
    if samples.version != self.version:
      raise TrainingError(f"generation server {self.client.url} generated with version {samples.version}, not "
                          f"the {self.version} it was given")
    return samples

  def _call(self, method, *args, **kwargs):
    """A call to the server; its failure ends the run in one line naming the server (the actor's
    checkpoints stay as its last save left them)."""
    try:
      return method(*args, **kwargs)
    except ServerGone as e:
      raise TrainingError(f"generation server {self.client.url}: {e}") from None
    except ServeError as e:  # a refused request or a failed refit: the server's reason
      raise TrainingError(str(e)) from None

  def release(self) -> None:
    """The server keeps its weights between rollouts; the actor holds no copy."""


ENGINES = {"local": LocalEngine, "served": ServedEngine}


def make_engine(c, graphdef, mesh, rules, gen_rules, log=print):
  """The engine ``config.rollout.engine`` names."""
  kind = c.rollout.engine
  if kind not in ENGINES:
    raise ConfigError(f"config.rollout.engine: {kind!r} is not one of {tuple(ENGINES)}")
  return ENGINES[kind](c, graphdef, mesh, rules, gen_rules, log=log)
