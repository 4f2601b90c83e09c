"""PPO with a critic (NeMo-Aligner's ``gpt_ppo_actor.yaml`` with its critic server).

Each PPO step (NeMo-Aligner's ``PPOTrainer``) takes the next ``ppo.num_rollout_samples`` prompts and:
  1. samples one response to each from the current policy (``jalign.recipes.rollouts``,
     ``ppo.rollout_micro_batch_size`` prompts at a time on each data-parallel rank);
  2. scores each prompt + response with the reward model (a jalign ``rm`` run, standardised as in
     ``jalign.score``) and reads the critic's value at every token; both run on ``critic.mesh``;
  3. takes the current (pi_old) and initial policy's log-probs, puts ``-kl_coef * |log pi_old - log
     pi_init|`` on every response token and the reward at the last one, and computes GAE advantages
     and returns over each row, the advantages whitened over the rollout (``losses.ppo``);
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

The critic and reward model are ``jalign.recipes.critic``'s job in the actor's process, on a mesh of
their own, unless ``critic.server`` names a critic server (``python -m jalign.serve``, NeMo's second
job), which ``jalign.serve.critic.RemoteCritic`` reaches with the same interface.
"""

from __future__ import annotations

import functools

import numpy as np

from jalign import specs, trainer
from jalign.losses import ppo
from jalign.recipes import critic as critic_lib
from jalign.recipes import rollouts as rollouts_lib
from jalign.serve.critic import RemoteCritic

class GAEAdvantages:
  """PPO's preparation of a scored rollout: the critic's values, KL rewards, GAE and whitened
  advantages, and the critic trained on the returns."""

  def __init__(self, c, critic: critic_lib.CriticJob):
    self.c, self.critic = c, critic

  def __call__(self, rollouts: rollouts_lib.Rollouts, batch: dict, stats: dict, step: int) -> dict:
    p = self.c.ppo
    old, init = rollouts.logprobs(batch)
    rollouts.compare_engine(batch, old, stats)
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
    report = functools.partial(rollouts.loop.metrics.write, step, prefix="critic")
    if self.c.critic.server and self.c.critic.overlap_train:  # the served critic trains beside the actor
      self.critic.train_async(critic_batch, report)
    else:
      report(self.critic.train(critic_batch))
    # A response cut off by the length limit trains the critic only (NeMo's is_end mask).
    batch.update(mask=mask * batch["is_end"][:, None],
                 old_logprobs=np.asarray(rollouts.behaviour_logprobs(batch, old), np.float32),
                 advantages=np.asarray(advantages, np.float32))
    return batch


def build(c, log=print) -> tuple[trainer.Trainer, rollouts_lib.Rollouts]:
  """The actor's trainer of a PPO config, fed by rollouts that also train its critic."""
  spec = specs.get(c.algorithm)
  settings = spec.sampling(c)
  policy = rollouts_lib.build_policy(c, settings, log, with_kl=True)
  options = rollouts_lib.trainer_options(c, bool(policy.val_prompts))
  critic: critic_lib.CriticJob
  if c.critic.server:  # a critic server started by python -m jalign.serve
    critic = RemoteCritic(c.critic.server, connect_timeout_s=c.critic.connect_timeout_s,
                          timeout_s=c.critic.timeout_s, log=log)
  else:
    critic = critic_lib.build(c, options, tok=policy.tok)
  rollouts = rollouts_lib.Rollouts(c, settings, policy.tok, policy.prompts,
                                   score=lambda examples, _: critic.rewards(examples), prepare=GAEAdvantages(c, critic),
                                   initial=policy.initial, current=policy.current, mesh=policy.mesh, rules=policy.rules,
                                   log=log, val_prompts=policy.val_prompts)
  loop = rollouts_lib.rollout_trainer(c, rollouts, policy, spec.rollout.loss(c), options=options, companion=critic)
  return loop, rollouts


def run(c, log=print) -> dict:
  loop, _ = build(c, log)
  return rollouts_lib.run_loop(c, loop, log)
