"""Preference-optimisation losses on per-sequence log-probs: the DPO family, SimPO and ORPO.

The losses take ``[B]`` per-sequence response log-probs, so the model code that makes them
(``sequence_logprobs`` over the token log-probs of ``jalign.kernels.token_logprobs``) is shared by every
variant, and the reference log-probs can come from anywhere (a frozen copy, LoRA adapters off, a file).

With rho = (log pi - log pi_ref) of a response, Delta = rho_chosen - rho_rejected and beta the
KL-penalty (NeMo's ``ref_policy_kl_penalty``), ``loss_type`` picks the per-pair loss, averaged over pairs:

- ``"dpo"``: -log sigma(beta Delta); with ``label_smoothing`` eps > 0 conservative DPO (cDPO, as in TRL;
  not in NeMo-Aligner): -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta).
- ``"ipo"``: (Delta - 1/(2 beta))^2, NeMo's and TRL's formula. TRL always averages the log-probs over
  the response tokens for IPO; NeMo averages only with ``preference_average_log_probs``. Here the caller
  chooses (``sequence_logprobs(..., average=True)`` for TRL's IPO); the formula on Delta is the same.
- ``"rpo_sq"``, ``"rpo_fwd_kl"``, ``"rpo_bwd_kl"``: NeMo's reward-aware preference optimisation, which
  fits the implicit reward gap beta Delta to the ground-truth gap Delta_r = eta (r_c - r_r)
  (``gt_reward_scale`` eta): squared error, KL(model || target) and KL(target || model) between the
  Bernoulli distributions sigma(+-beta Delta) and sigma(+-Delta_r). Not TRL's "rpo_alpha" (DPO + NLL).
- ``"simpo"``: SimPO (Meng et al. 2024; TRL ``CPOTrainer(loss_type="simpo")``), reference-free:
  -log sigma(beta (pi_c - pi_r) - gamma) on *length-averaged* policy log-probs (the caller averages),
  gamma = ``simpo_gamma``; ``ref_*`` may be None and are ignored. The paper uses beta around 2, not 0.2.

``orpo_loss`` is ORPO's odds-ratio objective (Hong et al. 2024; TRL ``ORPOTrainer``), which needs no
reference either; ``train_loss(loss_type="orpo")`` trains with it. NeMo's DPO ``sft_loss_weight`` mix is left to the caller (it adds its own NLL term).

Metrics (jnp scalars): ``rewards_chosen_mean`` / ``rewards_rejected_mean`` are the beta-scaled implicit
rewards beta rho (TRL's convention and NeMo's docs; NeMo's code logs the unscaled rho),
``reward_margin_mean`` their difference and ``accuracy`` = mean(rho_c > rho_r), strict as in NeMo.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.nn import log_sigmoid

from jalign.kernels import token_logprobs

LOSS_TYPES = ("dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "simpo")
# What ``train_loss`` takes: the above, and ORPO. These two need no reference model.
TRAIN_LOSS_TYPES = LOSS_TYPES + ("orpo",)
REFERENCE_FREE = ("simpo", "orpo")
_SMOOTHABLE = ("dpo", "simpo")


def _float(x):
  """``x`` as a jnp array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def sequence_logprobs(token_logprobs, mask, *, average=False):
  """Sum (or, with ``average``, mean) of ``token_logprobs [B, T]`` over ``mask [B, T]`` -> ``[B]``.

  Masked positions are ignored even when they hold -inf or NaN. The average divides by
  max(count, 1), as NeMo does, so a row with no response token gives 0.
  """
  lp = _float(token_logprobs)
  m = jnp.asarray(mask) != 0
  if m.shape != lp.shape:
    raise ValueError(f"mask {m.shape} must match token_logprobs {lp.shape}")
  total = jnp.sum(jnp.where(m, lp, 0.0), axis=-1)
  if average:
    total = total / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(total.dtype)
  return total


def _bernoulli_kl(log_p, log_np, log_q, log_nq):
  """KL(p || q) of two Bernoulli distributions given as (log p, log(1-p)) and (log q, log(1-q))."""
  return jnp.exp(log_p) * (log_p - log_q) + jnp.exp(log_np) * (log_np - log_nq)


def _check_common(beta, label_smoothing, loss_type):
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
  if _is_number(beta) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if _is_number(label_smoothing):
    if not 0.0 <= label_smoothing <= 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type not in _SMOOTHABLE:
      raise ValueError(f"label_smoothing applies to loss_type in {_SMOOTHABLE}, not {loss_type!r}")


def loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.2, loss_type="dpo",
         chosen_rewards=None, rejected_rewards=None, gt_reward_scale=1.0, label_smoothing=0.0,
         simpo_gamma=0.5, weights=None):
  """Preference loss over ``[B]`` per-sequence log-probs; returns ``(loss, metrics)``.

  ``loss_type`` in ``LOSS_TYPES`` (see the module docstring). ``chosen_rewards`` / ``rejected_rewards``
  ``[B]`` are the ground-truth rewards the ``rpo_*`` types need (ignored otherwise). ``weights`` ``[B]``
  (default all 1) weight the pairs in the loss and the metrics; 0 marks padding pairs.
  """
  _check_common(beta, label_smoothing, loss_type)
  pi_c, pi_r = _float(policy_chosen), _float(policy_rejected)
  if pi_c.shape != pi_r.shape:
    raise ValueError(f"policy_chosen {pi_c.shape} and policy_rejected {pi_r.shape} must match")
  if loss_type == "simpo":
    rho_c, rho_r = pi_c, pi_r
  else:
    if ref_chosen is None or ref_rejected is None:
      raise ValueError(f"loss_type {loss_type!r} needs ref_chosen and ref_rejected (only 'simpo' is reference-free)")
    ref_c, ref_r = _float(ref_chosen), _float(ref_rejected)
    if ref_c.shape != pi_c.shape or ref_r.shape != pi_c.shape:
      raise ValueError(f"reference log-probs {ref_c.shape}, {ref_r.shape} must match the policy's {pi_c.shape}")
    rho_c, rho_r = pi_c - ref_c, pi_r - ref_r
  delta = rho_c - rho_r
  eps = label_smoothing

  if loss_type in ("dpo", "simpo"):
    z = beta * delta - (simpo_gamma if loss_type == "simpo" else 0.0)
    per_pair = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
  elif loss_type == "ipo":
    per_pair = (delta - 1.0 / (2.0 * beta)) ** 2
  else:
    if chosen_rewards is None or rejected_rewards is None:
      raise ValueError(f"loss_type {loss_type!r} needs ground-truth chosen_rewards and rejected_rewards [B]")
    r_c, r_r = _float(chosen_rewards), _float(rejected_rewards)
    if r_c.shape != delta.shape or r_r.shape != delta.shape:
      raise ValueError(f"rewards {r_c.shape}, {r_r.shape} must match the log-probs {delta.shape}")
    gt_delta = gt_reward_scale * (r_c - r_r)
    model = beta * delta
    if loss_type == "rpo_sq":
      per_pair = (model - gt_delta) ** 2
    else:
      model_lp = (log_sigmoid(model), log_sigmoid(-model))
      target_lp = (log_sigmoid(gt_delta), log_sigmoid(-gt_delta))
      if loss_type == "rpo_fwd_kl":
        per_pair = _bernoulli_kl(*model_lp, *target_lp)
      else:
        per_pair = _bernoulli_kl(*target_lp, *model_lp)

  mean = _weighted_mean(weights, per_pair)
  total = mean(per_pair)
  metrics = {
      "rewards_chosen_mean": mean(beta * rho_c),
      "rewards_rejected_mean": mean(beta * rho_r),
      "reward_margin_mean": mean(beta * delta),
      "accuracy": mean((rho_c > rho_r).astype(total.dtype)),
  }
  return total, metrics


def _weighted_mean(weights, like):
  if weights is None:
    return jnp.mean
  w = _float(weights).astype(like.dtype)
  if w.shape != like.shape:
    raise ValueError(f"weights {w.shape} must match the pairs {like.shape}")
  total = jnp.maximum(jnp.sum(w), 1e-9)
  return lambda x: jnp.sum(w * x) / total


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_odds(avg_logprob):
  """log(p / (1 - p)) for p = exp(avg_logprob), the per-token geometric-mean probability ORPO uses."""
  x = _float(avg_logprob)
  return x - _log1mexp(x)


def orpo_loss(policy_chosen_avg, policy_rejected_avg, chosen_nll, *, lam=0.1, weights=None):
  """ORPO: ``mean(chosen_nll) + lam * mean(-log sigma(log_odds(chosen) - log_odds(rejected)))``.

  ``policy_*_avg`` ``[B]`` are length-averaged response log-probs (strictly negative),
  ``chosen_nll`` the SFT term on the chosen responses, ``[B]`` or a scalar (ORPO's per-token mean NLL).
  ``lam`` is ORPO's lambda (TRL's ``ORPOConfig.beta``, default 0.1). ``weights`` ``[B]`` (default all 1)
  weight the pairs in the means; 0 marks padding pairs. Returns ``(loss, metrics)`` with ``nll``,
  ``or_loss`` (before ``lam``), ``log_odds_ratio_mean``, ``accuracy`` (log-odds ratio > 0) and TRL's
  ``rewards_chosen_mean`` / ``rewards_rejected_mean`` = lam * average log-prob.
  """
  if _is_number(lam) and lam < 0:
    raise ValueError(f"lam must be >= 0, got {lam}")
  c, r = _float(policy_chosen_avg), _float(policy_rejected_avg)
  if c.shape != r.shape:
    raise ValueError(f"policy_chosen_avg {c.shape} and policy_rejected_avg {r.shape} must match")
  ratio = log_odds(c) - log_odds(r)
  mean = _weighted_mean(weights, ratio)
  or_loss = mean(-log_sigmoid(ratio))
  nll = mean(jnp.broadcast_to(_float(chosen_nll), ratio.shape))
  total = nll + lam * or_loss
  metrics = {
      "nll": nll,
      "or_loss": or_loss,
      "log_odds_ratio_mean": mean(ratio),
      "accuracy": mean((ratio > 0).astype(total.dtype)),
      "rewards_chosen_mean": mean(lam * c),
      "rewards_rejected_mean": mean(lam * r),
  }
  return total, metrics


# ----------------------------------------------------------------------------------------------
# On a model: the pieces the shared training loop calls
# ----------------------------------------------------------------------------------------------


def segment_sums(values, segment_ids, num_segments: int):
  """``[R, S]`` sums of ``values [R, L]`` over each row's segments 1..S (0 is padding)."""
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  return jnp.einsum("rl,rls->rs", values, onehot.astype(values.dtype))


def pair_logprobs(model, batch, *, average=False):
  """``(chosen [N], rejected [N])`` response log-probs of the pair slots of rows laid out by
  ``data.preference.pairs_row`` (pair p: segments 2p+1 and 2p+2) or ``shared_pairs_row`` (the prompt
  once, the responses as branches numbered by ``response_ids``), N = rows x slots; one forward pass."""
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"],
                               branch_ids=batch.get("branch_ids"))
  lp = token_logprobs(hidden, model.lm_head_kernel(), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  slots = batch["pair_mask"].shape[-1]
  responses = batch.get("response_ids", batch["segment_ids"])
  sums = segment_sums(jnp.where(mask > 0, lp, 0.0), responses, 2 * slots)
  if average:
    sums = sums / jnp.maximum(segment_sums(mask, responses, 2 * slots), 1.0)
  return sums[:, 0::2].reshape(-1), sums[:, 1::2].reshape(-1)


def reference_logprobs(model, batch, *, average=False):
  """The fields the reference pass adds to a pair batch: ``ref_chosen``, ``ref_rejected`` ``[R, slots]``."""
  chosen, rejected = pair_logprobs(model, batch, average=average)
  shape = batch["pair_mask"].shape
  return {"ref_chosen": chosen.reshape(shape), "ref_rejected": rejected.reshape(shape)}


def train_loss(model, batch, rng=None, *, beta=0.2, loss_type="dpo", label_smoothing=0.0, gt_reward_scale=1.0,
               simpo_gamma=0.5, average_log_probs=False, preference_weight=1.0, sft_weight=0.0):
  """``(loss_sum, pairs, metric_sums)`` of a micro-batch of pairs, for ``trainer.make_train_step``.

  The batch holds rows of pairs (``data.preference.pairs_row``: tokens, ..., ``pair_mask``,
  ``chosen_reward`` / ``rejected_reward``) and the reference pass's ``ref_chosen`` / ``ref_rejected``.
  Empty pair slots and padding rows weigh nothing.
  Loss = ``preference_weight`` x the preference loss + ``sft_weight`` x the chosen responses' NLL
  (summed, or averaged per token with ``average_log_probs``), NeMo-Aligner's mix. ``loss_type="orpo"``
  is ``orpo_loss`` with ``lam = beta`` on the length-averaged log-probs (it has its own NLL term).
  """
  del rng
  orpo = loss_type == "orpo"
  policy_chosen, policy_rejected = pair_logprobs(model, batch, average=average_log_probs or orpo)
  flat = lambda name: None if name not in batch else batch[name].reshape(-1)
  real = flat("pair_mask")
  if orpo:  # an empty slot's average log-prob is 0, whose odds are infinite: give it a finite stand-in
    chosen_avg, rejected_avg = (jnp.where(real > 0, x, -1.0) for x in (policy_chosen, policy_rejected))
    pref, metrics = orpo_loss(chosen_avg, rejected_avg, -chosen_avg, lam=beta, weights=real)
  else:
    pref, metrics = loss(policy_chosen, policy_rejected, flat("ref_chosen"), flat("ref_rejected"),
                         beta=beta, loss_type=loss_type, chosen_rewards=flat("chosen_reward"),
                         rejected_rewards=flat("rejected_reward"), gt_reward_scale=gt_reward_scale,
                         label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, weights=real)
  pairs = jnp.sum(real)
  sft = -jnp.sum(real * policy_chosen) / jnp.maximum(pairs, 1e-9)
  total = preference_weight * pref + sft_weight * sft
  sums = {k: v * pairs for k, v in metrics.items()}
  sums.update(preference_loss=pref * pairs, sft_loss=sft * pairs)
  return total * pairs, pairs, sums
