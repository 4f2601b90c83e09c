"""REINFORCE with the leave-one-out baseline (NeMo-Aligner's ``gpt_reinforce_actor.yaml``): samples of
the policy scored by a reward model, the KL to the initial policy subtracted from the reward."""

from pathlib import Path

import jax.numpy as jnp
import ml_collections

from jalign.losses import rloo
from jalign.specs.base import AlgorithmSpec, RolloutSettings, RolloutSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.reward_model = ""    # run:<folder> of a jalign reward model (algorithm rm); scores tokens
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


def settings(c, kept: int | None = None) -> RolloutSettings:
  r = c.reinforce
  return RolloutSettings(
      block="reinforce", prompts=r.num_rollout_samples, per_prompt=r.num_rollouts_per_prompt,
      kept=r.num_rollouts_per_prompt if kept is None else kept, micro_batch=r.rollout_batch_size,
      micro_batch_key="reinforce.rollout_batch_size", max_new_tokens=r.max_new_tokens,
      min_new_tokens=r.min_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, kl_coef=r.kl_coef,
      absolute_kl=r.absolute_kl, generation_rules=(), offload_optimizer=False, unload_engine_train=False)


def validate_sampling(c, check_files, kept: int):
  """The checks REINFORCE and rejection sampling share; ``kept``: samples of a prompt trained on."""
  r, length = c.reinforce, c.data.max_seq_length
  require(r.reward_model.startswith("run:"), "reinforce.reward_model",
          f"{r.reward_model!r}: name a reward model run, run:<folder>")
  if check_files:
    require((Path(r.reward_model[4:]) / "config.json").is_file(), "reinforce.reward_model",
            f"{r.reward_model[4:]} is not a jalign run folder")
  require(r.num_rollouts_per_prompt >= 2, "reinforce.num_rollouts_per_prompt",
          "must be at least 2 (the baseline, or the choice, is among a prompt's samples)")
  require(r.num_rollout_samples * kept % c.train.global_batch_size == 0, "reinforce.num_rollout_samples",
          f"{r.num_rollout_samples} x {kept} samples to train on do not split into global batches of "
          f"{c.train.global_batch_size}")
  require(0 <= r.max_new_tokens < length and 0 <= r.min_new_tokens <= (r.max_new_tokens or length // 2),
          "reinforce.max_new_tokens",
          f"need 0 <= min_new_tokens <= max_new_tokens < data.max_seq_length {length}")
  require(r.temperature > 0, "reinforce.temperature", "must be positive")


def validate(c, check_files):
  validate_sampling(c, check_files, c.reinforce.num_rollouts_per_prompt)


def train_fields(c) -> dict:
  return {"loss_mask": ("token", jnp.float32), "advantages": ("row", jnp.float32)}


SPEC = AlgorithmSpec(
    "reinforce", formats=("prompt",), recipe="reinforce", blocks={"reinforce": block}, validate=validate,
    rollout=RolloutSpec(settings=settings, train_fields=train_fields, loss=lambda c: rloo.train_loss, with_kl=True),
    plan_jobs=("actor",))
