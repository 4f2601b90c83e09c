"""The policy of a config served for generation (``python -m jalign.serve`` with ``generation.serve``;
``jalign.serve.generation`` binds it to PyTriton's endpoints), and the served rollout engine's end of
a refit: the job holds the generation copy of the policy (``jalign.rollout.engine.generation_copy``)
and replaces it with the copy an actor offers (``refit``), keeping the version it generates with."""

from __future__ import annotations

import jax
from flax import nnx

from jalign import specs
from jalign.parallel import mesh as pmesh
from jalign.recipes import build
from jalign.rollout import engine, refit
from jalign.rollout.generate import Rollout, generate
from jalign.rollout.sampling import Request, Samples, sample

# Prompts are padded to a multiple of this many tokens, so that requests of similar lengths share a
# compiled loop.
PROMPT_WIDTH_MULTIPLE = 32


class GenerationJob:
  """The policy of a config, as the copy its rollouts generate with (the compute dtype, laid out by the
  generation rules), placed on its mesh; each data-parallel group decodes its own rows when the batch
  divides over them."""

  def __init__(self, c, log=print):
    self.mesh, self.rules = pmesh.make_mesh(dict(c.mesh)), build.rules_of(c)
    model, own = build.build_model(c, self.mesh, self.rules)
    self.tokenizer = build.build_tokenizer(c, own)
    self.vocab_size = model.config.vocab_size
    self.add_bos = c.data.add_bos
    sampling = specs.sampling_settings(c) if specs.get(c.algorithm).sampling is not None else None
    self.gen_rules = engine.generation_rules(sampling, self.rules)
    graphdef, state = nnx.split(model)
    self.graphdef, copy = engine.generation_copy(c, graphdef, (state,), self.mesh, self.gen_rules)
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(copy((state,)))
    del model, state
    self.weights = [x for _, x in flat]
    self.described, self.mesh_shape = refit.describe(flat), refit.mesh_shape(self.weights)
    self.version = -1  # the config's own weights, until an actor refits them
    self.data_parallel = pmesh.data_parallel_size(self.mesh, self.rules)
    self._rows = pmesh.batch_sharding(self.mesh, self.rules)
    self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    self.log = log
    self._transfer = None  # this job's transfer server, started by the first refit

  @property
  def model(self):
    return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, self.weights))

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=None, **settings) -> Rollout:
    """A ``Rollout`` of host (numpy) arrays: every process of a server job gathers the whole of it."""
    if not prompts:
      raise ValueError("no prompts")
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE
    stops = tuple(stop_ids) if stop_ids is not None else tuple(
        i for i in (self.tokenizer.eos_id,) if i is not None)
    rows = self._rows if len(prompts) % self.data_parallel == 0 else None
    out = generate(self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=self.pad,
                   prompt_width=width, batch_sharding=rows, **settings)
    return Rollout(*(pmesh.fetch(x) for x in (out.tokens, out.prompt_lengths, out.lengths, out.is_end, out.logprobs)))

  def rollout(self, prompts: list[list[int]], request: Request) -> Samples:
    """A rollout engine's samples (``jalign.rollout.sampling.sample``), with the version generating them."""
    return Samples(*sample(self.model, prompts, request, self.mesh, self.gen_rules), self.version)

  def refit(self, manifest: dict, *, timeout_s: float) -> refit.Pulled:
    """The actor's offered copy in place of this job's (``jalign.rollout.refit``); on failure the job
    serves the version it had and ``RefitError`` says why."""
    if jax.process_count() > 1:
      raise refit.RefitError("a generation server of several processes cannot be refitted yet")
    refit.check(manifest, self.described, self.mesh_shape)
    if self._transfer is None:
      self._transfer = refit.start_server(refit.host_facing(manifest["address"]))
    try:
      done = refit.pull_weights(self.weights, manifest, timeout_s=timeout_s, connect=self._transfer.connect)
    except refit.RefitError as e:
      self.log(f"refit to version {manifest['version']} failed: {e}; serving version {self.version}", flush=True)
      raise
    self.version = done.version
    return done

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=self.add_bos)

  def decode(self, tokens: list[int]) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)
