"""The GRPO family: group-relative advantages and the clipped policy loss of GRPO, Dr. GRPO, DAPO and GSPO.

Each prompt is sampled G times; the samples of one prompt share a ``group_id`` and are scored by a
checker or a reward model. There is no critic: a sample's advantage is its reward against its group's.

- GRPO (DeepSeekMath): ``A = (r - mean_group) / (std_group + eps)``, the PPO clipped surrogate per
  token, each sequence's token mean then the mean over sequences, a k3 KL to the reference in the loss.
- Dr. GRPO: no division by the group's std (``scale_rewards=False``) and no division by each
  sequence's length: token sums over a constant (``aggregation="sequence_sum"``), so that long wrong
  answers are not favoured and easy or hard groups are not up-weighted.
- DAPO: clip-higher (``eps_high > eps_low``), the token mean over the whole batch
  (``aggregation="token_mean"``), dynamic sampling (groups whose rewards are all equal dropped: see
  ``zero_variance_groups``) and the overlong reward shaping of ``overlong_penalty``.
- GSPO: the importance ratio of the whole sequence, ``s = exp(mean_t(log pi - log pi_old))``, clipped
  as one (``ratio="sequence"``, with small clip ranges such as 3e-4 / 4e-4).

Arrays are ``[B,T]`` in the log-prob layout (column ``t`` scores token ``t+1``); ``mask`` marks the
response tokens a loss counts, ``advantages`` are ``[B]`` (one per sequence) or ``[B,T]``. The policy
loss is built in the trainer's ``(sum, weight)`` form, so that micro-batches sum to the exact
global-batch loss in every aggregation mode: ``policy_loss`` returns ``sum / weight``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.kernels import token_logprobs

AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIOS = ("token", "sequence")


def group_advantages(rewards, group_ids, *, scale_rewards: bool = True, eps: float = 1e-6) -> jax.Array:
  """``[B]``: each reward less its group's mean, over its group's standard deviation (Bessel-corrected,
  as torch computes it) plus ``eps`` when ``scale_rewards``. A group of one sample gets 0."""
  rewards = jnp.asarray(rewards, float)
  group_ids = jnp.asarray(group_ids)
  same = (group_ids[:, None] == group_ids[None, :]).astype(rewards.dtype)
  count = jnp.sum(same, axis=1)
  mean = same @ rewards / count
  centred = rewards - mean
  if not scale_rewards:
    return jnp.where(count > 1, centred, 0.0)
  var = same @ (centred ** 2) / jnp.maximum(count - 1, 1.0)
  return jnp.where(count > 1, centred / (jnp.sqrt(var) + eps), 0.0)


def zero_variance_groups(rewards, group_ids) -> jax.Array:
  """``[B]`` bool: the samples whose group's rewards are all equal (they teach nothing under group
  advantages; DAPO's dynamic sampling drops them)."""
  rewards = jnp.asarray(rewards, float)
  group_ids = jnp.asarray(group_ids)
  same = group_ids[:, None] == group_ids[None, :]
  differs = same & (rewards[:, None] != rewards[None, :])
  return ~jnp.any(differs, axis=1)


def overlong_penalty(lengths, *, max_length: int, window: int) -> jax.Array:
  """DAPO's soft overlong punishment ``[B]``: 0 for responses of at most ``max_length - window`` tokens,
  falling linearly to -1 at ``max_length``, and -1 beyond it."""
  lengths = jnp.asarray(lengths, float)
  if window <= 0:
    return jnp.where(lengths > max_length, -1.0, 0.0)
  start = max_length - window
  ramp = (start - lengths) / window
  return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_length, ramp, -1.0))


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k3") -> jax.Array:
  """Per-token estimates of KL(pi || pi_ref) on samples of pi (Schulman's k1, k2, k3): with
  ``d = log pi_ref - log pi``, k1 = -d, k2 = d^2 / 2, k3 = exp(d) - 1 - d (unbiased and never
  negative, GRPO's choice)."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; one of {KL_ESTIMATORS}")
  d = ref_logprobs - logprobs
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d * d
  return jnp.expm1(d) - d


def sequence_log_ratio(logprobs, old_logprobs, mask) -> jax.Array:
  """``[B]``: each sequence's mean of ``log pi - log pi_old`` over its masked tokens (0 for none)."""
  mask = jnp.asarray(mask, float)
  return jnp.sum((logprobs - old_logprobs) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def token_losses(logprobs, old_logprobs, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2,
                 dual_clip: float | None = None, ratio: str = "token"):
  """The clipped surrogate per token ``[B,T]``, ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``,
  and per-token indicators ``{"ratio", "clipped_low", "clipped_high", "dual_clipped"}``.

  ``ratio="token"``: ``r_t = exp(log pi_t - log pi_old_t)``. ``ratio="sequence"`` (GSPO): every token
  of a sequence carries the sequence's ratio ``s = exp(mean_t(log pi - log pi_old))`` as its value,
  and its gradient flows through each token's own log-prob (``s * grad(mean_t log pi)`` in all), which
  is GSPO's sequence-level objective written per token. ``dual_clip`` (``c > 1``): a negative
  advantage's loss is capped at ``-c A`` however large the ratio grows. ``clipped_low`` /
  ``clipped_high`` mark the tokens whose gradient clipping removes (ratio below ``1 - eps_low`` with
  A < 0, above ``1 + eps_high`` with A > 0)."""
  if ratio not in RATIOS:
    raise ValueError(f"unknown ratio {ratio!r}; one of {RATIOS}")
  mask = jnp.asarray(mask, float)
  advantages = jnp.asarray(advantages, float)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jax.lax.stop_gradient(advantages)
  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  if ratio == "sequence":
    log_s = jax.lax.stop_gradient(sequence_log_ratio(logprobs, old_logprobs, mask))[:, None]
    log_r = log_s + logprobs - jax.lax.stop_gradient(logprobs)
  else:
    log_r = logprobs - old_logprobs
  r = jnp.exp(log_r)
  clipped = jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(-advantages * r, -advantages * clipped)
  dual = jnp.zeros_like(loss, dtype=bool)
  if dual_clip is not None:
    cap = -advantages * dual_clip
    dual = (advantages < 0) & (loss > cap)
    loss = jnp.where(advantages < 0, jnp.minimum(loss, cap), loss)
  parts = {"ratio": r, "clipped_low": (r < 1.0 - eps_low) & (advantages < 0),
           "clipped_high": (r > 1.0 + eps_high) & (advantages > 0), "dual_clipped": dual}
  return loss, parts


def aggregate(values, mask, mode: str, *, norm_constant: float | None = None):
  """``(sum, weight)`` of per-token ``values`` ``[B,T]`` whose ratio is the loss of ``mode``:

  - ``token_mean``: every masked token of the batch weighs the same (DAPO): ``sum(v m) / sum(m)``;
  - ``sequence_mean``: each sequence's token mean, then the mean over sequences with tokens (GRPO);
  - ``sequence_sum``: each sequence's token sum over ``norm_constant`` (Dr. GRPO: the generation
    budget), then the mean over all sequences.

  Sums and weights of micro-batches add up to the global batch's."""
  if mode not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {mode!r}; one of {AGGREGATIONS}")
  mask = jnp.asarray(mask, float)
  masked = values * mask
  if mode == "token_mean":
    return jnp.sum(masked), jnp.sum(mask)
  tokens = jnp.sum(mask, axis=1)
  if mode == "sequence_mean":
    has = (tokens > 0).astype(mask.dtype)
    return jnp.sum(jnp.sum(masked, axis=1) / jnp.maximum(tokens, 1.0) * has), jnp.sum(has)
  if not norm_constant or norm_constant <= 0:
    raise ValueError("aggregation 'sequence_sum' needs a positive norm_constant (the generation budget)")
  return jnp.sum(masked) / norm_constant, jnp.asarray(mask.shape[0], mask.dtype)


def loss_sums(logprobs, old_logprobs, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None,
              ratio="token", aggregation="sequence_mean", norm_constant=None, ref_logprobs=None, kl_coef=0.0,
              kl_estimator="k3", entropy=None, entropy_coef=0.0, weights=None):
  """``(sum, weight, metric_sums)``: the policy loss of the family in the trainer's form.

  Per token: the clipped surrogate (``token_losses``), times ``weights`` (importance weights with no
  gradient, ``jalign.losses.offpolicy.tis_weights``), plus ``kl_coef`` x the ``kl_estimator`` estimate
  of KL to ``ref_logprobs``, less ``entropy_coef`` x ``entropy``; aggregated by ``aggregation``.
  Metrics (``policy_loss``, ``kl``, ``entropy``, ``ratio``, ``clip_low``, ``clip_high``,
  ``dual_clip``) aggregate the same way."""
  surrogate, parts = token_losses(logprobs, old_logprobs, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                                  dual_clip=dual_clip, ratio=ratio)
  if weights is not None:
    surrogate = surrogate * jax.lax.stop_gradient(weights)
  total = surrogate
  per_token = {"policy_loss": surrogate, "ratio": parts["ratio"],
               "clip_low": parts["clipped_low"].astype(surrogate.dtype),
               "clip_high": parts["clipped_high"].astype(surrogate.dtype)}
  if dual_clip is not None:
    per_token["dual_clip"] = parts["dual_clipped"].astype(surrogate.dtype)
  if ref_logprobs is not None:
    kl = kl_estimate(logprobs, jax.lax.stop_gradient(ref_logprobs), kl_estimator)
    total = total + kl_coef * kl
    per_token["kl"] = kl
  if entropy is not None:
    total = total - entropy_coef * entropy
    per_token["entropy"] = entropy
  if weights is not None:
    per_token["tis_weight"] = weights
  loss_sum, weight = aggregate(total, mask, aggregation, norm_constant=norm_constant)
  metrics = {k: aggregate(jax.lax.stop_gradient(v), mask, aggregation, norm_constant=norm_constant)[0]
             for k, v in per_token.items()}
  return loss_sum, weight, metrics


def policy_loss(logprobs, old_logprobs, advantages, mask, **settings):
  """``(loss, metrics)``: ``loss_sums``' sum over its weight (0 when nothing is masked in)."""
  loss_sum, weight, metric_sums = loss_sums(logprobs, old_logprobs, advantages, mask, **settings)
  scale = 1.0 / jnp.maximum(weight, 1e-9)
  return loss_sum * scale, {k: v * scale for k, v in metric_sums.items()}


def train_loss(model, batch, rng=None, **settings):
  """``(loss_sum, weight, metric_sums)`` of a micro-batch for ``trainer.make_train_step``. The batch
  holds ``tokens``, ``targets`` (tokens shifted left), ``loss_mask``, ``old_logprobs`` ``[B,T]`` and
  ``advantages`` ``[B]``; with a KL term ``ref_logprobs``, with ``rollout.tis_cap`` ``tis_weights``.
  ``settings`` are ``loss_sums``' keywords."""
  del rng
  wants_entropy = settings.get("entropy_coef", 0.0) > 0
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  out = token_logprobs(hidden, model.lm_head_kernel(), batch["targets"], return_entropy=wants_entropy)
  logprobs, entropy = out if wants_entropy else (out, None)
  return loss_sums(logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"].astype(jnp.float32),
                   ref_logprobs=batch.get("ref_logprobs"), entropy=entropy, weights=batch.get("tis_weights"),
                   **settings)
