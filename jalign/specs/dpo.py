"""Direct preference optimisation and its family (IPO, RPO, SimPO, conservative DPO) on comparison pairs,
NeMo-Aligner's names in comments."""

import functools

import ml_collections

from jalign.data import preference
from jalign.losses import dpo
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.beta = 0.2                 # ref_policy_kl_penalty (ORPO's lambda with loss_type orpo)
  b.loss_type = "dpo"          # preference_loss: dpo | ipo | rpo_sq | rpo_fwd_kl | rpo_bwd_kl | simpo | orpo
  b.label_smoothing = 0.0      # conservative DPO
  b.gt_reward_scale = 1.0
  b.simpo_gamma = 0.5
  b.average_log_probs = False  # preference_average_log_probs
  b.preference_weight = 1.0    # preference_loss_weight
  b.sft_weight = 0.0           # sft_loss_weight
  b.share_prompt = False       # compute each pair's prompt once (the responses as branches that see it)
  return b


def validate(c, check_files):
  p = c.dpo
  require(p.loss_type in dpo.TRAIN_LOSS_TYPES, "dpo.loss_type",
          f"{p.loss_type!r} is not one of {dpo.TRAIN_LOSS_TYPES}")
  require(p.beta > 0, "dpo.beta", "must be positive")
  require(p.preference_weight > 0 or p.sft_weight > 0, "dpo.preference_weight",
          "preference_weight and sft_weight are both 0: nothing to train")


def plan(c, items):
  size = preference.shared_pair_length if c.dpo.share_prompt else len
  return encoders.slotted_rows(c, items, size=size)


def row(c, slots):
  make = preference.shared_pairs_row if c.dpo.share_prompt else preference.pairs_row
  return functools.partial(make, max_pairs=slots), 2 * c.data.max_seq_length


def parts(c, model):
  p = c.dpo
  loss_fn = functools.partial(dpo.train_loss, beta=p.beta, loss_type=p.loss_type, label_smoothing=p.label_smoothing,
                              gt_reward_scale=p.gt_reward_scale, simpo_gamma=p.simpo_gamma,
                              average_log_probs=p.average_log_probs, preference_weight=p.preference_weight,
                              sft_weight=p.sft_weight)
  reference = None
  if p.loss_type not in dpo.REFERENCE_FREE:
    reference = functools.partial(dpo.reference_logprobs, average=p.average_log_probs)
  return model, loss_fn, reference


SPEC = AlgorithmSpec("dpo", formats=("comparison",), blocks={"dpo": block}, validate=validate,
                     encode=encoders.comparison_pairs, plan=plan, row=row, parts=parts)
