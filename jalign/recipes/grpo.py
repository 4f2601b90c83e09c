"""GRPO and its fixes (``algorithm = "grpo"``, ``jalign.specs.grpo``): RL with verifiable rewards.

A rollout (``jalign.recipes.rollouts``, on the shared rollout engine) samples ``samples_per_prompt``
responses to each of ``num_prompts`` prompts. Each response is scored by the weighted sum of the reward
functions ``grpo.reward_functions`` names (run in worker processes with a timeout per call:
``jalign.rewards.functions``; ``problem`` data gives them each prompt's ground truth) and, when
``grpo.reward_model`` names one, a reward model (a jalign ``rm`` run or a Hugging Face reward model).
Then:
  - DAPO's overlong shaping adds a penalty falling from 0 to -1 over the last ``overlong_fraction`` of
    the generation budget;
  - the policy's log-probs now (pi_old, the behaviour policy: the engine's with ``rollout.max_staleness``)
    and, with a KL term, the initial policy's; ``kl = "reward"`` subtracts ``kl_coef`` x each sequence's
    summed KL estimate from its reward;
  - advantages relative to the group (``losses.grpo.group_advantages``); with ``drop_zero_variance``
    (DAPO's dynamic sampling) groups whose rewards are all equal are replaced by such groups of up to
    ``max_resample_rounds`` extra rounds of prompts drawn at random, and those left train nothing;
  - ``num_prompts * samples_per_prompt / global_batch_size`` optimizer steps of the clipped policy loss
    in the preset's aggregation (``losses.grpo.train_loss``).
Rollout statistics: each reward source's mean, the reward's spread within groups, the fraction of
zero-variance groups, failed reward calls, response length, and the engine-trainer log-prob gap; the
clip fractions, KL and ratio come with the train step's metrics. Validation reports ``val_reward``,
the mean reward of one sample of each validation prompt at the config's temperature.
"""

from __future__ import annotations

import numpy as np

from jalign import specs
from jalign.losses import grpo
from jalign.parallel import mesh as pmesh
from jalign.recipes import rollouts as rollouts_lib
from jalign.recipes.reward import RewardModel
from jalign.rewards import functions
from jalign.specs import grpo as grpo_spec
from jalign.specs.base import ConfigError
from jalign.trainer import TrainingError


class Rewards:
  """The weighted sum of the config's reward functions and reward model over a rollout's samples; the
  latest call's per-source means in ``last``."""

  def __init__(self, c, tok, reward_model: RewardModel | None, rows: int, log=print):
    g = c.grpo
    try:
      named = [functions.parse(spec) for spec in g.reward_functions.split(",") if spec.strip()]
      self.pool = functions.RewardPool(named, timeout_s=g.reward_timeout_s, on_error=g.reward_on_error,
                                       default=g.reward_default, workers=g.reward_workers, log=log) if named else None
    except functions.RewardError as e:
      raise ConfigError(f"config.grpo.reward_functions: {e}") from None
    self.tok, self.reward_model, self.weight, self.rows = tok, reward_model, g.reward_model_weight, rows
    self.last: dict[str, float] = {}

  def __call__(self, examples, scoring: rollouts_lib.Scoring) -> np.ndarray:
    total = np.zeros(len(examples))
    self.last = {}
    if self.pool is not None:
      if any(r is None for r in scoring.records):
        raise ConfigError("config.data.format: reward functions need problem data (each prompt's record); "
                          "use data.format='problem' or score with grpo.reward_model alone")
      items = [functions.Item(self.tok.decode(p), self.tok.decode(r), rec, rec.get("where", "?"))
               for p, r, rec in zip(scoring.prompts, scoring.responses, scoring.records)]
      before = self.pool.failures
      try:
        values, parts = self.pool.score(items)
      except functions.RewardError as e:  # grpo.reward_on_error = "stop"
        raise TrainingError(str(e)) from None
      total += np.asarray(values)
      self.last = {f"reward/{name.rpartition(':')[2]}": float(np.mean(v)) for name, v in parts.items()}
      self.last["reward_failures"] = float(self.pool.failures - before)
    if self.reward_model is not None:
      scores = np.asarray(self.reward_model.rewards(examples, batch_size=self.rows))
      total += self.weight * scores
      self.last["reward/reward_model"] = float(np.mean(scores))
    return total.astype(np.float32)

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()


class GroupAdvantages:
  """GRPO's preparation of a scored rollout: shaped rewards, group advantages, the behaviour policy's
  and (with a KL term) the initial policy's log-probs."""

  def __init__(self, c, rewards: Rewards):
    self.c, self.rewards = c, rewards
    self.settings = grpo_spec.resolved(c)
    self.max_new = grpo_spec.max_new_tokens(c)

  def shaped(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """The rewards of a scored batch with DAPO's overlong penalty added, and the penalty."""
    rewards = np.asarray(batch["rewards"], np.float64)
    penalty = np.zeros_like(rewards)
    if self.settings["overlong_fraction"] > 0:
      window = max(1, int(round(self.settings["overlong_fraction"] * self.max_new)))
      penalty = np.asarray(grpo.overlong_penalty(batch["loss_mask"].sum(axis=1), max_length=self.max_new,
                                                 window=window), np.float64)
    return rewards + penalty, penalty

  def refill(self, rollouts: rollouts_lib.Rollouts, batch: dict, stats: dict, step: int) -> dict:
    """DAPO's dynamic sampling: the rollout's groups whose shaped rewards differ, topped up with such
    groups of up to ``max_resample_rounds`` extra rounds of prompts, then (when still short) with its
    zero-variance groups, which train nothing. As many groups as the rollout had."""
    wanted = len(np.unique(batch["group_ids"]))
    batches, picked, flat_ones = [batch], [], []

    def sort(b, index):
      shaped, _ = self.shaped(b)
      flat = np.asarray(grpo.zero_variance_groups(shaped, b["group_ids"]))
      for g in dict.fromkeys(b["group_ids"].tolist()):
        (flat_ones if flat[b["group_ids"] == g][0] else picked).append((index, g))

    sort(batch, 0)
    rounds = 0
    while len(picked) < wanted and rounds < self.settings["max_resample_rounds"]:
      rounds += 1
      batches.append(rollouts.more_groups(step, rounds))
      sort(batches[-1], rounds)
    chosen = (picked + flat_ones)[:wanted]
    stats.update(resample_rounds=float(rounds), informative_groups=float(min(len(picked), wanted) / wanted))
    parts = []
    for index, b in enumerate(batches):
      groups = {g for i, g in chosen if i == index}
      rows = np.flatnonzero(np.isin(b["group_ids"], list(groups)))
      if len(rows):
        parts.append({key: value[rows] for key, value in b.items()})
    return rollouts_lib.concat_rows(parts, rollouts.pad)

  def __call__(self, rollouts: rollouts_lib.Rollouts, batch: dict, stats: dict, step: int) -> dict:
    s = self.settings
    stats.update(self.rewards.last)
    if s["drop_zero_variance"] and s["max_resample_rounds"] > 0:
      batch = self.refill(rollouts, batch, stats, step)
    rewards, penalty = self.shaped(batch)
    mask = batch["loss_mask"]
    if s["overlong_fraction"] > 0:
      stats["overlong_penalty"] = float(np.mean(penalty))
    old, init = rollouts.logprobs(batch)
    rollouts.compare_engine(batch, old, stats)
    if init is not None:
      kl = np.asarray(grpo.kl_estimate(old, init, s["kl_estimator"])) * mask
      stats["init_policy_kl"] = float(kl.sum() / max(mask.sum(), 1.0))
      if s["kl"] == "reward":
        rewards = rewards - s["kl_coef"] * kl.sum(axis=1)
      else:
        batch["ref_logprobs"] = init.astype(np.float32)
    group_ids = batch["group_ids"]
    advantages = np.asarray(grpo.group_advantages(rewards, group_ids, scale_rewards=s["scale_rewards"]))
    flat = np.asarray(grpo.zero_variance_groups(rewards, group_ids))
    if s["drop_zero_variance"]:
      batch["loss_mask"] = mask * ~flat[:, None]
    batch["advantages"] = advantages.astype(np.float32)
    batch["old_logprobs"] = np.asarray(rollouts.behaviour_logprobs(batch, old), np.float32)
    spread = [np.std(rewards[group_ids == g]) for g in np.unique(group_ids)]
    stats.update(shaped_reward=float(np.mean(rewards)), reward_std_in_group=float(np.mean(spread)),
                 zero_variance_groups=float(np.mean(flat)), advantage_abs=float(np.mean(np.abs(advantages))))
    return batch


def build(c, log=print):
  """The trainer of a GRPO config, fed by its rollouts; and the rollouts."""
  spec = specs.get(c.algorithm)
  settings = spec.sampling(c)
  policy = rollouts_lib.build_policy(c, settings, log, with_kl=spec.rollout.initial(c), with_old=spec.rollout.old(c))
  reward_model = None
  if c.grpo.reward_model:
    reward_model = RewardModel.load_to_score(c, "grpo.reward_model", policy.mesh, policy.rules)
    reward_model.check_reads(policy.tok, "grpo.reward_model")
  rows = rollouts_lib.generation_rows(settings, pmesh.data_parallel_size(policy.mesh, policy.rules))
  rewards = Rewards(c, policy.tok, reward_model, rows, log)
  rollouts = rollouts_lib.Rollouts(c, settings, policy.tok, policy.prompts, score=rewards,
                                   prepare=GroupAdvantages(c, rewards), initial=policy.initial,
                                   current=policy.current, mesh=policy.mesh, rules=policy.rules, log=log,
                                   val_prompts=policy.val_prompts, records=policy.records,
                                   val_records=policy.val_records)
  loop = rollouts_lib.rollout_trainer(c, rollouts, policy, spec.rollout.loss(c))
  return loop, rollouts, rewards


def run(c, log=print) -> dict:
  loop, _, rewards = build(c, log)
  try:
    return rollouts_lib.run_loop(c, loop, log)
  finally:
    rewards.close()
