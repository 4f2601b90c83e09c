"""GRPO and its fixes (Dr. GRPO, DAPO, GSPO): a group of samples per prompt, rewards from verifiers,
reward functions or a reward model, group-relative advantages and no critic (``jalign.losses.grpo``).

``grpo.preset`` picks the settings each paper uses; any key set in the config wins over its preset:

| preset  | scale_rewards | eps_low / eps_high | ratio    | aggregation   | kl            | zero-variance groups                    | overlong |
|---------|---------------|--------------------|----------|---------------|---------------|-----------------------------------------|----------|
| grpo    | yes           | 0.2 / 0.2          | token    | sequence_mean | loss, k3 0.04 | kept                                    | off      |
| dr_grpo | no            | 0.2 / 0.2          | token    | sequence_sum  | none          | kept                                    | off      |
| dapo    | yes           | 0.2 / 0.28         | token    | token_mean    | none          | replaced (up to 3 rounds), else dropped | last 20% |
| gspo    | yes           | 3e-4 / 4e-4        | sequence | sequence_mean | none          | kept                                    | off      |
"""

import functools

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from jalign.losses import grpo
from jalign.specs.base import (SAMPLING_KEYS, AlgorithmSpec, RolloutSettings, RolloutSpec, require,
                               require_reward_model, require_sampling, sampling)

PRESETS = {
    "grpo": dict(scale_rewards=True, eps_low=0.2, eps_high=0.2, ratio="token", aggregation="sequence_mean",
                 kl="loss", kl_coef=0.04, kl_estimator="k3", drop_zero_variance=False, overlong_fraction=0.0,
                 max_resample_rounds=0),
    "dr_grpo": dict(scale_rewards=False, eps_low=0.2, eps_high=0.2, ratio="token", aggregation="sequence_sum",
                    kl="none", kl_coef=0.0, kl_estimator="k3", drop_zero_variance=False, overlong_fraction=0.0,
                    max_resample_rounds=0),
    "dapo": dict(scale_rewards=True, eps_low=0.2, eps_high=0.28, ratio="token", aggregation="token_mean",
                 kl="none", kl_coef=0.0, kl_estimator="k3", drop_zero_variance=True, overlong_fraction=0.2,
                 max_resample_rounds=3),
    "gspo": dict(scale_rewards=True, eps_low=3e-4, eps_high=4e-4, ratio="sequence", aggregation="sequence_mean",
                 kl="none", kl_coef=0.0, kl_estimator="k3", drop_zero_variance=False, overlong_fraction=0.0,
                 max_resample_rounds=0),
}
KL_MODES = ("loss", "reward", "none")
PRESET_TYPES = {"scale_rewards": bool, "eps_low": float, "eps_high": float, "ratio": str, "aggregation": str,
                "kl": str, "kl_coef": float, "kl_estimator": str, "drop_zero_variance": bool,
                "overlong_fraction": float, "max_resample_rounds": int}


def block():
  b = ml_collections.ConfigDict()
  b.preset = "grpo"              # grpo | dr_grpo | dapo | gspo: the defaults of the keys left unset below
  # Rewards, summed: each function's value times its weight, plus reward_model_weight x the reward model.
  b.reward_functions = "jalign.rewards.math_answers:final_answer"  # comma-separated module:function[*weight]
  b.reward_model = ""            # run:<jalign rm run> | hf:<Hugging Face reward model folder>; "" for none
  b.reward_model_weight = 1.0
  b.reward_timeout_s = 10.0      # per call of a reward function
  b.reward_on_error = "default"  # a call that raises, times out or is not a finite number: default | stop
  b.reward_default = 0.0
  b.reward_workers = 2           # processes running the reward functions
  # Sampling (config.rollout.* over these).
  b.num_prompts = 64
  b.samples_per_prompt = 8
  b.micro_batch_size = 32
  b.max_new_tokens = 0           # 0: data.max_seq_length // 2
  b.min_new_tokens = 1
  b.temperature = 1.0
  b.top_k = 0
  b.top_p = 1.0
  # The loss; None: the preset's.
  for key, kind in PRESET_TYPES.items():
    b[key] = config_dict.placeholder(kind)
  b.dual_clip = 0.0              # > 1: a negative advantage's loss capped at dual_clip x |A|; 0: off
  b.norm_constant = 0            # sequence_sum's divisor; 0: the generation budget (max_new_tokens)
  b.entropy_coef = 0.0
  return b


NAMES = {key: key for key in SAMPLING_KEYS}  # the block holds every shared sampling key under its own name


def resolved(c) -> dict:
  """The loss and shaping settings: each key of ``grpo`` as set, else its preset's."""
  require(c.grpo.preset in PRESETS, "grpo.preset", f"{c.grpo.preset!r} is not one of {tuple(PRESETS)}")
  preset = PRESETS[c.grpo.preset]
  return {key: preset[key] if c.grpo[key] is None else c.grpo[key] for key in PRESET_TYPES}


def settings(c) -> RolloutSettings:
  picked = sampling(c, "grpo", block(), NAMES)
  per_prompt = picked["samples_per_prompt"][0]
  return RolloutSettings.from_sampling(picked, kept=per_prompt)


def max_new_tokens(c) -> int:
  return settings(c).max_new_tokens or c.data.max_seq_length // 2


def loss_settings(c) -> dict:
  """``jalign.losses.grpo.loss_sums``' keywords of config ``c``."""
  r = resolved(c)
  return dict(eps_low=r["eps_low"], eps_high=r["eps_high"], dual_clip=c.grpo.dual_clip or None, ratio=r["ratio"],
              aggregation=r["aggregation"], norm_constant=float(c.grpo.norm_constant or max_new_tokens(c)),
              kl_coef=r["kl_coef"] if r["kl"] == "loss" else 0.0, kl_estimator=r["kl_estimator"],
              entropy_coef=c.grpo.entropy_coef)


def needs_reference(c) -> bool:
  """Whether the initial policy's log-probs are needed (a KL term in the loss or the reward)."""
  r = resolved(c)
  return r["kl"] != "none" and r["kl_coef"] > 0


def validate(c, check_files):
  g, s, r = c.grpo, settings(c), resolved(c)
  require_sampling(c, s, "advantages are relative to the group")
  require(bool(g.reward_functions.strip()) or bool(g.reward_model), "grpo.reward_functions",
          "no reward: name reward functions or a grpo.reward_model")
  require(not g.reward_functions.strip() or c.data.format == "problem", "grpo.reward_functions",
          f"reward functions read each prompt's record: they need data.format 'problem', not {c.data.format!r}")
  if g.reward_model:
    require_reward_model(g.reward_model, "grpo.reward_model", check_files)
  require(g.reward_on_error in ("default", "stop"), "grpo.reward_on_error",
          f"{g.reward_on_error!r} is not default or stop")
  require(g.reward_timeout_s > 0, "grpo.reward_timeout_s", "must be positive")
  require(g.reward_workers >= 1, "grpo.reward_workers", "must be at least 1")
  require(0 <= r["eps_low"] < 1 and r["eps_high"] >= 0, "grpo.eps_low", "need 0 <= eps_low < 1 and eps_high >= 0")
  require(r["ratio"] in grpo.RATIOS, "grpo.ratio", f"{r['ratio']!r} is not one of {grpo.RATIOS}")
  require(r["aggregation"] in grpo.AGGREGATIONS, "grpo.aggregation",
          f"{r['aggregation']!r} is not one of {grpo.AGGREGATIONS}")
  require(r["kl"] in KL_MODES, "grpo.kl", f"{r['kl']!r} is not one of {KL_MODES}")
  require(r["kl_estimator"] in grpo.KL_ESTIMATORS, "grpo.kl_estimator",
          f"{r['kl_estimator']!r} is not one of {grpo.KL_ESTIMATORS}")
  require(r["kl_coef"] >= 0, "grpo.kl_coef", "must not be negative")
  require(0 <= r["overlong_fraction"] < 1, "grpo.overlong_fraction", "must be in [0, 1)")
  require(r["max_resample_rounds"] >= 0, "grpo.max_resample_rounds", "must not be negative")
  require(g.dual_clip == 0 or g.dual_clip > 1, "grpo.dual_clip", f"{g.dual_clip}: 0 (off) or above 1")
  require(g.norm_constant >= 0, "grpo.norm_constant", "must not be negative")


def train_fields(c) -> dict:
  fields = {"loss_mask": ("token", jnp.float32), "advantages": ("row", jnp.float32),
            "old_logprobs": ("token", jnp.float32)}
  if loss_settings(c)["kl_coef"] > 0:
    fields["ref_logprobs"] = ("token", jnp.float32)
  if c.rollout.tis_cap:
    fields["tis_weights"] = ("token", jnp.float32)
  return fields


def loss(c):
  return functools.partial(grpo.train_loss, **loss_settings(c))


SPEC = AlgorithmSpec(
    "grpo", formats=("problem", "prompt"), recipe="grpo", blocks={"grpo": block}, validate=validate,
    sampling=settings,
    rollout=RolloutSpec(train_fields=train_fields, loss=loss, with_kl=needs_reference, reward_model="grpo.reward_model",
                        always_old=True),
    plan_jobs=("actor",))
