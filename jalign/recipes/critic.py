"""PPO's critic job: the critic (a ``ValueModel`` trained on each rollout's returns) and the reward model
that scores the rollouts, both on ``critic.mesh``, as NeMo-Aligner's critic server holds them. It runs
in the actor's process, or behind ``python -m jalign.serve`` (PyTriton), whose client
(``jalign.serve.critic.RemoteCritic``) has the same interface, ``CriticJob``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jalign import specs, trainer
from jalign.checkpoints import checkpoint_manager
from jalign.losses import ppo
from jalign.models import LlamaConfig, hf_value
from jalign.models.heads import ValueModel
from jalign.parallel import mesh as pmesh
from jalign.recipes import build as build_lib
from jalign.recipes.reward import SOURCES, RewardModel, reward_model_config
from jalign.specs.base import ConfigError


class CriticJob(Protocol):
  """What PPO's actor asks of its critic job, in-process (``Critic``) or served (``RemoteCritic``)."""

  def values(self, batch: dict) -> np.ndarray:
    """``[N, T]`` values of a rollout's rows (tokens, positions, segment_ids)."""

  def rewards(self, examples: list) -> np.ndarray:
    """``[N]`` standardised rewards of prompt + response examples."""

  def train(self, batch: dict) -> dict:
    """One epoch on a rollout's returns; the mean of its steps' metrics."""

  def save(self, step: int, metrics: dict | None = None) -> None: ...

  def restore(self, step: int) -> None: ...

  def wait(self) -> None:
    """Until every save has finished."""


def values_of(model, batch):
  return {"values": model.values(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])}


def _parts(batch: dict, size: int):
  for start in range(0, len(batch["tokens"]), size):
    yield {key: value[start:start + size] for key, value in batch.items()}


class Critic:
  """The critic job: a ``ValueModel`` on ``critic.mesh`` that gives values and trains on returns, with
  checkpoints of its own (the actor's ``Trainer`` saves and restores it as its companion), and the
  reward model beside it."""

  def __init__(self, c, model: ValueModel, reward: RewardModel, *, total_steps: int,
               options: trainer.TrainerOptions, rules, mesh=None):
    cc = c.critic
    self.mesh, self.rules = mesh or pmesh.make_mesh(dict(cc.mesh)), rules
    self.reward = reward.place(self.mesh, rules)
    self.vocab_size = min(model.config.vocab_size, reward.model.config.vocab_size)  # the ids it can read
    self.batch_size = cc.global_batch_size
    schedule, tx = critic_optimizer(c, total_steps)
    graphdef, state = trainer.init_state(model, tx, seed=c.seed + 1, schedule=schedule, mesh=self.mesh, rules=rules)
    self.state_sharding = pmesh.tree_shardings(state, self.mesh, rules)
    self.state = pmesh.place(state, self.state_sharding)
    micro = build_lib.micro_batches(cc.global_batch_size, cc.micro_batch_size, self.mesh, rules)
    self._step_fn = critic_train_step(c, graphdef, tx, self.mesh, rules)
    self._step = None
    self._values = trainer.jit_reference_pass(graphdef, values_of, micro_batches=micro,
                                              out_sharding=pmesh.batch_sharding(self.mesh, rules))
    self.directory = Path(c.run_dir) / "critic" / "checkpoints"
    self.checkpoints = checkpoint_manager(self.directory, options, name="critic")
    self.offload_optimizer = cc.offload_adam_states

  def _optimizer_away(self):
    """With ``critic.offload_adam_states`` the optimizer state waits in host memory while the critic
    serves values and rewards (NeMo's critic offloads its Adam states so), on the devices to train."""
    return trainer.optimizer_in_host_memory(self, self.offload_optimizer)

  def values(self, batch: dict) -> np.ndarray:
    """``[N,T]`` values of a rollout's rows, ``critic.global_batch_size`` rows at a time."""
    out = []
    with pmesh.use(self.mesh, self.rules), self._optimizer_away():
      for part in _parts({k: batch[k] for k in ("tokens", "positions", "segment_ids")}, self.batch_size):
        part = pmesh.put_global_batch(part, self.mesh, self.rules)
        out.append(pmesh.fetch(self._values(self.state.params, self.state.rest, part)["values"]))
    return np.concatenate(out)

  def rewards(self, examples) -> np.ndarray:
    """``[N]`` standardised rewards of prompt + response examples (token lists)."""
    with pmesh.use(self.mesh, self.rules), self._optimizer_away():
      return self.reward.rewards(examples, batch_size=self.batch_size)

  def train(self, batch: dict) -> dict:
    """One epoch over ``batch`` (tokens, positions, segment_ids, mask, old_values, returns): the mean of
    each optimizer step's metrics."""
    totals: dict[str, float] = {}
    steps = 0
    with pmesh.use(self.mesh, self.rules):
      for part in _parts(batch, self.batch_size):
        part = pmesh.put_global_batch(part, self.mesh, self.rules)
        if self._step is None:
          self._step = trainer.jit_train_step(self._step_fn, self.state_sharding,
                                              pmesh.batch_shardings(part, self.mesh, self.rules))
        self.state, metrics = self._step(self.state, part)
        for key, value in jax.device_get(metrics).items():
          totals[key] = totals.get(key, 0.0) + float(value)
        steps += 1
    out = {key: value / steps for key, value in totals.items() if key != "weight"}
    out["optimizer_steps"] = int(jax.device_get(self.state.step))
    return out

  def save(self, step: int, metrics: dict | None = None):
    self.checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.checkpointed(self.state))),
                          metrics=metrics, force=True)

  def restore(self, step: int):
    self.checkpoints.reload()  # the folder may have changed since this job started (a served critic)
    if step not in self.checkpoints.all_steps():
      raise trainer.TrainingError(f"{self.directory}: no critic checkpoint at step {step}, the actor's latest "
                                  f"(critic steps: {sorted(self.checkpoints.all_steps())})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.checkpointed(self.state))
    restored = self.checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    self.state = trainer.restored_state(restored.state, self.state)

  def wait(self):
    self.checkpoints.wait_until_finished()


def critic_optimizer(c, total_steps: int):
  """The critic's optimizer: ``critic.lr``, ``critic.min_lr`` and ``critic.weight_decay`` over its own
  steps, the actor's warm-up, betas and clipping."""
  cc = c.critic
  return build_lib.build_optimizer(c, max_steps=total_steps, lr=cc.lr, min_lr=cc.min_lr, weight_decay=cc.weight_decay)


def critic_train_step(c, graphdef, tx, mesh, rules):
  """The critic's pure train step: the clipped value loss against a rollout's returns."""
  cc = c.critic
  micro = build_lib.micro_batches(cc.global_batch_size, cc.micro_batch_size, mesh, rules)
  return trainer.make_train_step(graphdef, functools.partial(ppo.critic_train_loss, clip=cc.loss_clip), tx,
                                 micro_batches=micro)


def critic_config(c, key: str) -> LlamaConfig:
  """The model config of the critic (``key="init"``) or reward model (``"reward_model"``): a run's or a
  Hugging Face reward model's, or ``critic.preset``'s for a random one, in the config's dtypes."""
  kwargs = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
  init = c.critic[key]
  if init.startswith(SOURCES):
    return reward_model_config(init).replace(**kwargs)
  return LlamaConfig.preset(c.critic.preset, **kwargs)


def critic_steps(c) -> int:
  """The critic's optimizer steps over the run: one epoch of each rollout."""
  prompts, t = specs.sampling_settings(c).prompts, c.train
  rollouts_total = -(-t.max_steps // (prompts // t.global_batch_size))
  return rollouts_total * (prompts // c.critic.global_batch_size)


def _same_model(a: str, b: str) -> bool:
  """Whether two ``run:``/``hf:`` names are the same folder."""
  kind_a, _, folder_a = a.partition(":")
  kind_b, _, folder_b = b.partition(":")
  return kind_a == kind_b and Path(folder_a).absolute() == Path(folder_b).absolute()


def critic_model(c, reward: RewardModel, mesh=None, rules=None) -> ValueModel:
  """The critic ``critic.init`` names: a copy of a reward model's, a run's or a Hugging Face folder's
  (NeMo's start), or a random one; with ``mesh``, made or read straight into its shardings by ``rules``.
  It trains in ``model.param_dtype``, where the reward model, which only scores, is kept in the compute
  dtype: from the same folder it is read again unless the two are one dtype."""
  cc, m = c.critic, c.model
  if cc.init == "random":
    cfg = critic_config(c, "init")
    return pmesh.create_sharded(lambda: ValueModel(cfg, 1, rngs=nnx.Rngs(c.seed + 2)), mesh, rules)
  if _same_model(cc.init, cc.reward_model) and m.param_dtype == m.dtype:
    return reward.critic()
  if cc.init.startswith("hf:"):
    with pmesh.use(mesh, rules):  # the reader places each tensor by the rules active here
      return hf_value.load(cc.init[3:], dtype=m.param_dtype, compute_dtype=m.dtype, remat=m.remat, mesh=mesh)
  trains_as = {"param_dtype": m.param_dtype, "dtype": m.dtype, "remat": m.remat}
  return RewardModel.load(cc.init[4:], mesh=mesh, rules=rules, model=trains_as).model  # read for it alone


def build(c, options: trainer.TrainerOptions, *, tok=None) -> Critic:
  """The critic job a PPO config names: its reward model (``critic.reward_model``: a ``run:`` folder or
  a Hugging Face ``hf:`` one), its start (``critic.init``) and an optimizer scheduled over the run's
  rollouts. ``tok``: the policy's tokenizer, whose ids both models must read (``RewardModel.check_reads``;
  a served critic does not know it)."""
  cc = c.critic
  if not cc.reward_model.startswith(SOURCES):
    raise ConfigError(f"config.critic.reward_model: {cc.reward_model!r}; PPO training needs a reward "
                      "model, run:<folder> or hf:<folder>")
  mesh, rules = pmesh.make_mesh(dict(cc.mesh)), build_lib.rules_of(c)
  reward = RewardModel.load_to_score(c, "critic.reward_model", mesh, rules)
  if tok is not None:
    reward.check_reads(tok, "critic.reward_model")
  value_model = critic_model(c, reward, mesh, rules)
  if tok is not None and value_model.config.vocab_size < tok.vocab_size:
    raise ConfigError(f"config.critic.init: a vocabulary of {value_model.config.vocab_size} tokens, fewer "
                      f"than the policy's tokenizer's {tok.vocab_size}; it reads the policy's tokens")
  return Critic(c, value_model, reward, total_steps=critic_steps(c), options=options, rules=rules, mesh=mesh)
