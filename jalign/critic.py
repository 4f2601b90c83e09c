"""PPO's critic job in the actor's process: the critic (a ``ValueModel`` trained on each rollout's returns)
and the reward model that scores the rollouts, both on ``critic.mesh``, as NeMo-Aligner's critic server
holds them. ``jalign.serve`` serves the same object over PyTriton, and its client has the same
interface: ``values(batch)``, ``rewards(examples)``, ``train(batch)``, ``save(step, metrics)``,
``restore(step)`` and ``wait()``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jalign import config as config_lib
from jalign import optim, trainer
from jalign.algos import ppo
from jalign.models import LlamaConfig
from jalign.models.heads import ValueModel
from jalign.parallel import mesh as pmesh
from jalign.score import RewardModel


def _values_of(model, batch):
  return {"values": model.values(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])}


def _parts(batch: dict, size: int):
  for start in range(0, len(batch["tokens"]), size):
    yield {key: value[start:start + size] for key, value in batch.items()}


class Critic:
  """The critic job: a ``ValueModel`` on ``critic.mesh`` that gives values and trains on returns, with
  checkpoints of its own (the actor's ``Trainer`` saves and restores it as its companion), and the
  reward model beside it."""

  def __init__(self, c, model: ValueModel, reward: RewardModel, *, total_steps: int,
               options: trainer.TrainerOptions, rules):
    cc, o = c.critic, c.optimizer
    self.mesh, self.rules = pmesh.make_mesh(dict(cc.mesh)), rules
    self.reward = reward.place(self.mesh, rules)
    self.batch_size = cc.global_batch_size
    schedule = optim.nemo_schedule(cc.lr, max_steps=total_steps, warmup_steps=o.warmup_steps,
                                   constant_steps=o.constant_steps, min_lr=cc.min_lr)
    tx = optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=cc.weight_decay,
                     grad_clip=o.grad_clip or None)
    graphdef, state = trainer.init_state(model, tx, seed=c.seed + 1)
    self.state_sharding = pmesh.tree_shardings(state, self.mesh, rules)
    self.state = pmesh.place(state, self.state_sharding)
    micro = cc.global_batch_size // (cc.micro_batch_size * pmesh.data_parallel_size(self.mesh, rules))
    self._step_fn = trainer.make_train_step(graphdef, functools.partial(ppo.critic_train_loss, clip=cc.loss_clip),
                                            tx, schedule, micro_batches=micro)
    self._step = None
    self._values = jax.jit(functools.partial(trainer.reference_pass, graphdef, _values_of, micro_batches=micro),
                           out_shardings=pmesh.batch_sharding(self.mesh, rules))
    self.directory = Path(c.run_dir) / "critic" / "checkpoints"
    self.checkpoints = trainer.checkpoint_manager(self.directory, options)

  def values(self, batch: dict) -> np.ndarray:
    """``[N,T]`` values of a rollout's rows, ``critic.global_batch_size`` rows at a time."""
    out = []
    with pmesh.use(self.mesh, self.rules):
      for part in _parts({k: batch[k] for k in ("tokens", "positions", "segment_ids")}, self.batch_size):
        part = pmesh.put_global_batch(part, self.mesh, self.rules)
        out.append(pmesh.fetch(self._values(self.state.params, self.state.rest, part)["values"]))
    return np.concatenate(out)

  def rewards(self, examples) -> np.ndarray:
    """``[N]`` standardised rewards of prompt + response examples (token lists)."""
    with pmesh.use(self.mesh, self.rules):
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
          self._step = jax.jit(self._step_fn, donate_argnums=0,
                               in_shardings=(self.state_sharding, pmesh.batch_shardings(part, self.mesh, self.rules)),
                               out_shardings=(self.state_sharding, None))
        self.state, metrics = self._step(self.state, part)
        for key, value in jax.device_get(metrics).items():
          totals[key] = totals.get(key, 0.0) + float(value)
        steps += 1
    out = {key: value / steps for key, value in totals.items() if key != "weight"}
    out["optimizer_steps"] = int(jax.device_get(self.state.step))
    return out

  def save(self, step: int, metrics: dict | None = None):
    self.checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state.replace(rest=None))),
                          metrics=metrics, force=True)

  def restore(self, step: int):
    self.checkpoints.reload()  # the folder may have changed since this job started (a served critic)
    if step not in self.checkpoints.all_steps():
      raise trainer.TrainingError(f"{self.directory}: no critic checkpoint at step {step}, the actor's latest "
                                  f"(critic steps: {sorted(self.checkpoints.all_steps())})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state.replace(rest=None))
    restored = self.checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    self.state = restored.state.replace(rest=self.state.rest)

  def wait(self):
    self.checkpoints.wait_until_finished()


def critic_model(c, reward: RewardModel, reward_dir: str) -> ValueModel:
  """The critic ``critic.init`` names: a copy of a reward model run's (NeMo's start), or a random one."""
  cc = c.critic
  if cc.init == "random":
    config = LlamaConfig.preset(cc.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
    return ValueModel(config, 1, rngs=nnx.Rngs(c.seed + 2))
  if Path(cc.init[4:]).absolute() == Path(reward_dir).absolute():
    return reward.critic()
  return RewardModel.load(cc.init[4:]).critic()


def build(c, options: trainer.TrainerOptions, *, vocab_size: int | None = None) -> Critic:
  """The critic job a PPO config names: its reward model (``critic.reward_model``, a ``run:`` folder),
  its start (``critic.init``) and an optimizer scheduled over the run's rollouts. ``vocab_size``: the
  policy tokenizer's, which both models must cover."""
  cc, p, t = c.critic, c.ppo, c.train
  if not cc.reward_model.startswith("run:"):
    raise config_lib.ConfigError(f"config.critic.reward_model: {cc.reward_model!r}; PPO training needs a reward "
                                 "model run, run:<folder>")
  reward = RewardModel.load_to_score(c, "critic.reward_model")
  value_model = critic_model(c, reward, cc.reward_model[4:])
  for key, other in (("reward_model", reward.model), ("init", value_model)):
    if vocab_size is not None and other.config.vocab_size < vocab_size:
      raise config_lib.ConfigError(f"config.critic.{key}: a vocabulary of {other.config.vocab_size} tokens, fewer "
                                   f"than the policy's tokenizer's {vocab_size}; it reads the policy's tokens")
  rollouts_total = -(-t.max_steps // (p.num_rollout_samples // t.global_batch_size))
  return Critic(c, value_model, reward, total_steps=rollouts_total * (p.num_rollout_samples // cc.global_batch_size),
                options=options, rules=tuple(tuple(r) for r in c.sharding_rules))
