"""Online rejection sampling (NeMo-Aligner's ``gpt_rs_actor.yaml``): rollouts sampled and scored as
``config.reinforce`` says (its KL settings unused); each prompt's best samples train with the SFT loss."""

import jax.numpy as jnp
import ml_collections

from jalign.losses import sft
from jalign.specs import reinforce
from jalign.specs.base import AlgorithmSpec, RolloutSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.top_n_rollouts = 1          # top_n_rollouts: samples kept per prompt
  return b


def settings(c):
  return reinforce.settings(c, kept=c.rs.top_n_rollouts)


def validate(c, check_files):
  s = settings(c)
  require(1 <= s.kept <= s.per_prompt, "rs.top_n_rollouts",
          f"{s.kept} is not within 1..{s.keys['per_prompt']} {s.per_prompt}")
  reinforce.validate_sampling(c, check_files, s)
  require(not c.rollout.tis_cap, "rollout.tis_cap", "rs trains on its best samples with the SFT loss, without importance weights")


SPEC = AlgorithmSpec(
    "rs", formats=("prompt",), recipe="rs", blocks={"rs": block}, validate=validate,
    sampling=settings,
    rollout=RolloutSpec(train_fields=lambda c: {"loss_mask": ("token", jnp.float32)},
                        loss=lambda c: sft.loss, with_kl=False),
    plan_jobs=("actor",))
