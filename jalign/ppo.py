"""PPO with a critic (NeMo-Aligner's ``gpt_ppo_actor.yaml`` with its critic server), in one process.

Each PPO step (reference/nemo_aligner.md §3.2) takes the next ``ppo.num_rollout_samples`` prompts and:
  1. samples one response to each from the current policy (the JAX decode loop of ``jalign.reinforce``'s
     rollouts, ``ppo.rollout_micro_batch_size`` prompts at a time);
  2. scores each prompt + response with the reward model (a jalign ``rm`` run, standardised as in
     ``jalign.score``) and reads the critic's value at every token; both run on ``critic.mesh``;
  3. takes the current (pi_old) and initial policy's log-probs, puts ``-kl_coef * |log pi_old - log
     pi_init|`` on every response token and the reward at the last one, and computes GAE advantages
     and returns over each row, the advantages whitened over the rollout (``algos.ppo``);
  4. trains the critic one epoch over the rollout, ``critic.global_batch_size`` rows per optimizer step,
     on the clipped value loss against those returns;
  5. trains the actor one shuffled epoch over the rollout, ``num_rollout_samples / train.global_batch_size``
     optimizer steps of the clipped surrogate, on the responses that ended (a response cut off by the
     length limit trains the critic only).
The actor runs on the shared ``Trainer`` (its step counts actor optimizer steps); the critic is its
``companion``, with an optimizer of its own (``critic.lr``, ``critic.min_lr``, ``critic.weight_decay``;
the actor's warm-up and betas) and checkpoints in ``<run_dir>/critic/checkpoints`` saved, kept and
restored at the actor's steps. Rollout statistics go to ``metrics.jsonl`` under split ``rollout``, the
critic's under ``critic``. Validation answers each validation prompt once with a fixed seed and reports
``val_reward`` (the checkpoint monitor, higher is better). A resumed run starts a fresh rollout.

Where NeMo runs the critic and reward model as a PyTriton server in a second job, here they are objects
in the actor's process on a mesh of their own; the numbers each computes are the same.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jalign import config as config_lib
from jalign import optim, reinforce, train, trainer
from jalign.algos import ppo, rloo
from jalign.models.heads import ValueModel
from jalign.models import LlamaConfig
from jalign.parallel import mesh as pmesh
from jalign.score import RewardModel

ACTOR_FIELDS = ("tokens", "targets", "positions", "segment_ids", "mask", "old_logprobs", "advantages")


def _values_of(model, batch):
  return {"values": model.values(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])}


def _parts(batch: dict, size: int):
  for start in range(0, len(batch["tokens"]), size):
    yield {key: value[start:start + size] for key, value in batch.items()}


class Critic:
  """The critic job: a ``ValueModel`` on ``critic.mesh`` that gives values and trains on returns, with
  checkpoints of its own; the actor's ``Trainer`` saves and restores it as its companion."""

  def __init__(self, c, model: ValueModel, *, total_steps: int, options: trainer.TrainerOptions, rules):
    cc, o = c.critic, c.optimizer
    self.mesh, self.rules = pmesh.make_mesh(dict(cc.mesh)), rules
    self.batch_size = cc.global_batch_size
    schedule = optim.nemo_schedule(cc.lr, max_steps=total_steps, warmup_steps=o.warmup_steps,
                                   constant_steps=o.constant_steps, min_lr=cc.min_lr)
    tx = optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=cc.weight_decay,
                     grad_clip=o.grad_clip or None)
    graphdef, state = trainer.init_state(model, tx, seed=c.seed + 1)
    self.state_sharding = pmesh.tree_shardings(state, self.mesh, rules)
    self.state = jax.device_put(state, self.state_sharding)
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
        part = pmesh.put_batch(part, self.mesh, self.rules)
        out.append(np.asarray(self._values(self.state.params, self.state.rest, part)["values"]))
    return np.concatenate(out)

  def train(self, batch: dict) -> dict:
    """One epoch over ``batch`` (tokens, positions, segment_ids, mask, old_values, returns): the mean of
    each optimizer step's metrics."""
    totals: dict[str, float] = {}
    steps = 0
    with pmesh.use(self.mesh, self.rules):
      for part in _parts(batch, self.batch_size):
        part = pmesh.put_batch(part, self.mesh, self.rules)
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
    if step not in self.checkpoints.all_steps():
      raise trainer.TrainingError(f"{self.directory}: no critic checkpoint at step {step}, the actor's latest "
                                  f"(critic steps: {sorted(self.checkpoints.all_steps())})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state.replace(rest=None))
    restored = self.checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    self.state = restored.state.replace(rest=self.state.rest)

  def wait(self):
    self.checkpoints.wait_until_finished()


class PPORollouts(reinforce.Rollouts):
  """The REINFORCE rollouts (one sample per prompt), scored by the reward model on the critic's mesh,
  with values, KL rewards, GAE and whitened advantages, the critic trained on each."""

  def __init__(self, *args, critic: Critic, **kwargs):
    super().__init__(*args, **kwargs)
    self.critic = critic

  def score(self, examples) -> np.ndarray:
    with pmesh.use(self.critic.mesh, self.rules):
      return super().score(examples)

  def prepare(self, batch: dict, stats: dict, step: int) -> dict:
    p = self.c.ppo
    old, init = self._logprobs(batch)
    mask = batch["loss_mask"]
    values = self.critic.values(batch)
    rewards, kl = ppo.rewards_with_kl(batch["rewards"], old, init, mask, kl_coef=p.kl_coef, absolute_kl=p.absolute_kl)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
    raw = np.asarray(advantages)
    if p.normalize_advantages:
      advantages = ppo.whiten(advantages, mask)
    returns = np.asarray(returns, np.float32)
    on = mask > 0
    stats.update(init_policy_kl=float(np.asarray(kl)[on].mean()),
                 rewards_with_kl=float(np.mean(np.sum(np.asarray(rewards), axis=1))),
                 advantages_mean=float(raw[on].mean()), advantages_std=float(raw[on].std()),
                 returns_mean=float(returns[on].mean()), returns_std=float(returns[on].std()),
                 values_mean=float(values[on].mean()), values_std=float(values[on].std()))
    critic_batch = {key: batch[key] for key in ("tokens", "positions", "segment_ids")}
    critic_batch.update(mask=mask, old_values=values.astype(np.float32), returns=returns)
    self.loop.metrics.write(step, self.critic.train(critic_batch), prefix="critic")
    # A response cut off by the length limit trains the critic only (NeMo's is_end mask).
    batch.update(mask=mask * batch["is_end"][:, None], old_logprobs=old.astype(np.float32),
                 advantages=np.asarray(advantages, np.float32))
    return {key: batch[key] for key in ACTOR_FIELDS}


def critic_model(c, reward: RewardModel, reward_dir: str) -> ValueModel:
  """The critic ``critic.init`` names: a copy of a reward model run's (NeMo's start), or a random one."""
  cc = c.critic
  if cc.init == "random":
    config = LlamaConfig.preset(cc.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
    return ValueModel(config, 1, rngs=nnx.Rngs(c.seed + 2))
  if Path(cc.init[4:]).absolute() == Path(reward_dir).absolute():
    return reward.critic()
  return RewardModel.load(cc.init[4:]).critic()


def build(c, log=print) -> tuple[trainer.Trainer, PPORollouts]:
  """The actor's trainer of a PPO config, fed by rollouts that also train its critic."""
  config_lib.validate(c, process_count=jax.process_count(), device_count=jax.device_count())
  p, cc, t = c.ppo, c.critic, c.train
  if jax.process_count() > 1:
    raise config_lib.ConfigError("config.algorithm: ppo training runs in one process (its rollouts are not "
                                 "spread over processes yet); python -m jalign.plan sizes multi-host PPO")
  if not cc.reward_model.startswith("run:"):
    raise config_lib.ConfigError(f"config.critic.reward_model: {cc.reward_model!r}; PPO training needs a reward "
                                 "model run, run:<folder>")
  reward = RewardModel.load(cc.reward_model[4:])
  if reward.config.data.max_seq_length < c.data.max_seq_length:
    raise config_lib.ConfigError(f"config.critic.reward_model: it scores up to {reward.config.data.max_seq_length} "
                                 f"tokens, fewer than data.max_seq_length {c.data.max_seq_length}")
  rules = tuple(tuple(r) for r in c.sharding_rules)
  mesh = pmesh.make_mesh(dict(c.mesh))
  run_dir = Path(c.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(c.to_json_best_effort(indent=2))
  model, own = train.build_model(c)
  tok = train.build_tokenizer(c, own)
  value_model = critic_model(c, reward, cc.reward_model[4:])
  for key, other in (("reward_model", reward.model), ("init", value_model)):
    if other.config.vocab_size < tok.vocab_size:
      raise config_lib.ConfigError(f"config.critic.{key}: a vocabulary of {other.config.vocab_size} tokens, fewer "
                                   f"than the policy's tokenizer's {tok.vocab_size}; it reads the policy's tokens")
  prompts = reinforce.load_prompts(c, tok, log)
  val_prompts = reinforce.load_prompts(c, tok, log, c.data.validation) if c.data.validation else None
  options = reinforce.trainer_options(c, bool(val_prompts))
  actor_steps_per_rollout = p.num_rollout_samples // t.global_batch_size
  rollouts_total = -(-t.max_steps // actor_steps_per_rollout)
  critic = Critic(c, value_model, total_steps=rollouts_total * (p.num_rollout_samples // cc.global_batch_size),
                  options=options, rules=rules)
  # The reward model scores on the critic's mesh, as NeMo serves it beside the critic.
  graphdef, weights = nnx.split(reward.model)
  reward.model = nnx.merge(graphdef, jax.device_put(weights, pmesh.tree_shardings(weights, critic.mesh, rules)))

  micro_batches = t.global_batch_size // (t.micro_batch_size * pmesh.data_parallel_size(mesh, rules))
  schedule, tx = train.build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=train.trainable_filter(c))
  initial = trainer.ReferencePass(graphdef, state, rloo.token_logprobs_of, mesh=mesh, rules=rules,
                                  offload=c.reference.offload, micro_batches=micro_batches)
  current = jax.jit(functools.partial(trainer.reference_pass, graphdef, rloo.token_logprobs_of,
                                      micro_batches=micro_batches))
  rollouts = PPORollouts(c, tok, prompts, reward, initial, current, mesh=mesh, rules=rules, log=log,
                         val_prompts=val_prompts, critic=critic)
  loss_fn = functools.partial(ppo.actor_train_loss, clip_eps=p.clip_eps, entropy_coef=p.entropy_coef)
  loop = reinforce.rollout_trainer(c, rollouts, graphdef, state, loss_fn, tx, schedule, options,
                                   micro_batches=micro_batches, mesh=mesh, rules=rules, companion=critic)
  return loop, rollouts


def run(c, log=print) -> dict:
  return reinforce.run(c, log, build=build)
