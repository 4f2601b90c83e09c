"""The served rollout engine (``rollout.engine="served"``): the decode loop of a generation server job
beside the actor (``python -m jalign.serve --config.generation.serve=True``), refitted from the actor
through ``jalign.rollout.refit``. It answers the calls of ``jalign.rollout.engine``'s engines."""

from __future__ import annotations

import time

import jax
from flax import nnx

from jalign.rollout import refit
from jalign.rollout.engine import LocalEngine
from jalign.rollout.sampling import Request, Samples
from jalign.serve.generation import RemoteGenerator
from jalign.serve.triton import ServeError, ServerGone
from jalign.specs.base import ConfigError
from jalign.trainer import TrainingError


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
    self.pulled = None  # the server's answer to the last refit: version, buckets, bytes, seconds

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
    self.version, self.pulled = version, answer
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
