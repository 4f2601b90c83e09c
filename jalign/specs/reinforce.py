"""REINFORCE with the leave-one-out baseline (NeMo-Aligner's ``gpt_reinforce_actor.yaml``): samples of
the policy scored by a reward model, the KL to the initial policy subtracted from the reward."""

import jax.numpy as jnp
import ml_collections

from jalign.losses import rloo
from jalign.specs.base import (AlgorithmSpec, RolloutSettings, RolloutSpec, require_reward_model,
                               require_sampling, sampling)


def block():
  b = ml_collections.ConfigDict()
  b.reward_model = ""    # run:<jalign reward model run (algorithm rm)> | hf:<HF reward model folder>; scores tokens
  b.num_rollout_samples = 512  # prompts per rollout
  b.num_rollouts_per_prompt = 4
  b.rollout_batch_size = 32    # rollout_micro_batch_size: sequences generated at once per data-parallel rank
  b.max_new_tokens = 0   # length_params.max_length; 0: data.max_seq_length // 2
  b.min_new_tokens = 1   # length_params.min_length
  b.temperature = 1.0
  b.top_k = 0
  b.top_p = 1.0
  b.kl_coef = 0.01       # initial_policy_kl_penalty
  b.absolute_kl = True   # use_absolute_kl
  return b


NAMES = {"num_prompts": "num_rollout_samples", "samples_per_prompt": "num_rollouts_per_prompt",
         "micro_batch_size": "rollout_batch_size", "max_new_tokens": "max_new_tokens",
         "min_new_tokens": "min_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


def settings(c, kept: int | None = None) -> RolloutSettings:
  """The sampling keys (``config.rollout`` over ``config.reinforce``); ``kept``: samples of a prompt
  trained on (all of them by default)."""
  picked = sampling(c, "reinforce", block(), NAMES)
  per_prompt = picked["samples_per_prompt"][0]
  return RolloutSettings.from_sampling(picked, kept=per_prompt if kept is None else kept,
                                       kl_coef=c.reinforce.kl_coef, absolute_kl=c.reinforce.absolute_kl)


def validate_sampling(c, check_files, s: RolloutSettings):
  """The checks REINFORCE and rejection sampling share."""
  require_reward_model(c.reinforce.reward_model, "reinforce.reward_model", check_files)
  require_sampling(c, s, "the baseline, or the choice, is among a prompt's samples")


def validate(c, check_files):
  validate_sampling(c, check_files, settings(c))


def train_fields(c) -> dict:
  fields = {"loss_mask": ("token", jnp.float32), "advantages": ("row", jnp.float32)}
  if c.rollout.tis_cap:
    fields["tis_weights"] = ("token", jnp.float32)
  return fields


SPEC = AlgorithmSpec(
    "reinforce", formats=("prompt",), recipe="reinforce", blocks={"reinforce": block}, validate=validate,
    sampling=settings,
    rollout=RolloutSpec(train_fields=train_fields, loss=lambda c: rloo.train_loss, with_kl=True),
    plan_jobs=("actor",))
