"""REINFORCE with the leave-one-out baseline (NeMo-Aligner's ``gpt_reinforce_actor.yaml``) and online
rejection sampling (``gpt_rs_actor.yaml``): the policy samples, a reward model scores, and the policy
trains on what it sampled.

A rollout (``jalign.recipes.rollouts``) samples ``reinforce.num_rollouts_per_prompt`` responses to each
of ``reinforce.num_rollout_samples`` prompts and the reward model (a jalign ``rm`` run, or a Hugging Face
reward model folder) scores each prompt + response as tokens, standardised as in ``jalign.score``. Then
REINFORCE:
  - takes the policy's log-probs now (pi_old) and the initial policy's (the starting weights, frozen):
    each sample's KL is the masked mean of ``|log pi_old - log pi_init|``, its reward R = r - kl_coef * KL;
  - the baseline of a sample is the mean R of the other samples of its prompt that ended
    (``losses.rloo.baseline``), the advantage R - b;
  - the samples, shuffled, make ``num_rollout_samples * num_rollouts_per_prompt / global_batch_size``
    optimizer steps of ``losses.rloo.train_loss``, the masked mean of ``-log pi(t) * advantage`` over the
    responses of the samples that ended (a response cut off by the length limit trains nothing).
Rejection sampling keeps each prompt's ``rs.top_n_rollouts`` highest-reward samples and trains on them
with the SFT loss over their responses; it needs no KL and no initial policy.
Validation reports the mean reward ``val_reward`` of one reply to each validation prompt, by which
``train.keep_best`` keeps checkpoints (higher is better). A resumed run starts a fresh rollout.
"""

from __future__ import annotations

import numpy as np

from jalign import specs, trainer
from jalign.losses import rloo
from jalign.parallel import mesh as pmesh
from jalign.recipes import rollouts as rollouts_lib
from jalign.recipes.reward import RewardModel


def rloo_advantages(rollouts: rollouts_lib.Rollouts, batch: dict, stats: dict, step: int) -> dict:
  """REINFORCE's preparation: rewards less the KL to the initial policy, minus the leave-one-out
  baseline of the prompt's other samples; responses cut off by the length limit train nothing."""
  r = rollouts.r
  rewards, group_ids, is_end = batch["rewards"], batch["group_ids"], batch["is_end"]
  old, init = rollouts.logprobs(batch)
  rollouts.compare_engine(batch, old, stats)
  kl = np.asarray(rloo.sequence_kl(old, init, batch["loss_mask"], absolute_kl=r.absolute_kl))
  total = rewards - r.kl_coef * kl
  baselines = np.asarray(rloo.baseline(total, group_ids, is_end))
  batch["advantages"] = (total - baselines).astype(np.float32)
  # Responses cut off by the length limit train nothing ("micro-batches without any ended sample get
  # zero loss"), as in NeMo's PPO actor; they still shape the baselines' counts through is_end.
  batch["loss_mask"] = batch["loss_mask"] * is_end[:, None]
  stats.update(init_policy_kl=float(np.mean(kl)), rewards_with_kl=float(np.mean(total)),
               advantage_std=float(np.std(batch["advantages"])))
  return batch


def best_samples(rollouts: rollouts_lib.Rollouts, batch: dict, stats: dict, step: int) -> dict:
  """Rejection sampling's preparation: each prompt's ``kept`` highest-reward samples."""
  keep = top_per_group(batch["rewards"], batch["group_ids"], rollouts.r.kept)
  stats["selected_reward"] = float(np.mean(batch["rewards"][keep]))
  return {key: value[keep] for key, value in batch.items()}


def top_per_group(rewards, group_ids, n: int) -> np.ndarray:
  """Indices of each group's ``n`` highest rewards (the earlier sample first among equals), in order."""
  keep = []
  for g in np.unique(group_ids):
    members = np.flatnonzero(group_ids == g)
    keep += members[np.argsort(-rewards[members], kind="stable")[:n]].tolist()
  return np.sort(np.asarray(keep))


# What each algorithm of this recipe (its spec's ``recipe``) trains on from a scored rollout.
PREPARE = {"reinforce": rloo_advantages, "rs": best_samples}


def build(c, log=print) -> tuple[trainer.Trainer, rollouts_lib.Rollouts]:
  """The trainer of a REINFORCE or rejection sampling config, fed by its rollouts."""
  spec = specs.get(c.algorithm)
  prepare = PREPARE[spec.recipe]
  settings = spec.sampling(c)
  policy = rollouts_lib.build_policy(c, settings, log, with_kl=spec.rollout.initial(c))
  # The reward model scores inside the trainer's mesh, so its weights are read onto it (by the same rules).
  reward = RewardModel.load_to_score(c, spec.rollout.reward_model, policy.mesh, policy.rules)
  reward.check_reads(policy.tok, spec.rollout.reward_model)
  rows = rollouts_lib.generation_rows(settings, pmesh.data_parallel_size(policy.mesh, policy.rules))
  rollouts = rollouts_lib.Rollouts(c, settings, policy.tok, policy.prompts,
                                   score=lambda examples, _: reward.rewards(examples, batch_size=rows), prepare=prepare,
                                   initial=policy.initial, current=policy.current, mesh=policy.mesh,
                                   rules=policy.rules, log=log, val_prompts=policy.val_prompts)
  loop = rollouts_lib.rollout_trainer(c, rollouts, policy, spec.rollout.loss(c))
  return loop, rollouts


def run(c, log=print) -> dict:
  loop, _ = build(c, log)
  return rollouts_lib.run_loop(c, loop, log)
