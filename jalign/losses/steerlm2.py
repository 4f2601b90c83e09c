"""SteerLM 2.0 (NeMo-Aligner ``GPTSteerLMModel``): fit Q_theta(y|a,x) to P(y|a,x) by importance sampling.

The target is P(y|a,x) proportional to P(a|x,y) P(y|x) (attribute model times unconditional model); the
samples y_1..y_n of each prompt come from an earlier SteerLM model Q'(y|a,x). Minimising KL(P || Q_theta)
with self-normalised importance weights and a baseline gives, per group of n responses to one prompt:

    w_i = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x))   (data side: ``importance_weights``)
    b_i = softmax_i(log Q_theta(y_i|a,x) - log Q'(y_i|a,x))            (no gradient: ``baseline``)
    L_g = sum_{i in g} (w_i - b_i) * NLL_i(theta) / Nbar_g

NLL_i = -log Q_theta(y_i|a,x) is the summed response-token NLL and Nbar_g the mean response-token count
of the group; the batch loss is the mean of L_g over groups, so grad L = -mean_g sum_i (w_i - b_i)
grad log Q_theta(y_i) / Nbar_g. NeMo divides each micro-batch's sum by Nbar_g / (micro-batches per
group) and Megatron then averages over all micro-batches: the micro-batch count cancels and the result
is the mean over groups above. NeMo computes b in a separate forward-only pass with the same weights;
here it is the stop-gradient of the same log-probs, which has the same value.

Groups are marked by integer ``group_ids [B]`` (any values, any order; samples with equal ids form a
group), computed with a ``[B, B]`` same-group matrix so no static group count is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses.dpo import segment_sums
from jalign.kernels import token_logprobs

DISTANCE_EPS = 1e-8


def _float(x):
  """``x`` as a jnp array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _same_group(group_ids):
  g = jnp.asarray(group_ids)
  if g.ndim != 1:
    raise ValueError(f"group_ids must be [B], got shape {g.shape}")
  return g[:, None] == g[None, :]


def group_softmax(logits, group_ids):
  """Softmax of ``logits [B]`` within each group of equal ``group_ids [B]``."""
  x = _float(logits)
  same = _same_group(group_ids)
  if x.shape != same.shape[:1]:
    raise ValueError(f"logits {x.shape} must be [B] like group_ids {same.shape[:1]}")
  top = jax.lax.stop_gradient(jnp.max(jnp.where(same, x[None, :], -jnp.inf), axis=-1))
  e = jnp.exp(x - top)
  denom = jnp.sum(jnp.where(same, e[None, :], 0.0), axis=-1)
  return e / denom


def importance_weights(log_p_attr, log_p_y, log_q_prime, group_ids):
  """w_i = group-softmax of log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x) (the dataset's ``ws``)."""
  return group_softmax(_float(log_p_attr) + _float(log_p_y) - _float(log_q_prime), group_ids)


def baseline(logprobs, q_prime_logprobs, group_ids):
  """b_i = group-softmax of log Q_theta(y_i|a,x) - log Q'(y_i|a,x), detached."""
  return jax.lax.stop_gradient(group_softmax(_float(logprobs) - _float(q_prime_logprobs), group_ids))


def loss(logprobs, q_prime_logprobs, weights, group_ids, num_tokens, sample_mask=None):
  """SteerLM 2.0 loss; returns ``(loss, metrics)``. All arguments are ``[B]``.

  ``logprobs``: log Q_theta(y_i|a,x), the summed response-token log-probs of the model being trained
  (differentiable); ``q_prime_logprobs``: log Q'(y_i|a,x) from the data; ``weights``: the importance
  weights w_i (``importance_weights``, normalised within each group); ``group_ids``: which prompt each
  response answers; ``num_tokens``: response-token counts (a group's mean is clamped at >= 1).
  ``sample_mask`` (1/0): samples with 0 (empty slots, padding rows) take no part: not in any group's
  softmax, mean token count or group count, and no loss.
  Metrics: ``distance`` = mean over groups of KL(w || b) with 1e-8 added to both (NeMo's logged value),
  ``nll_per_token`` = mean over samples of NLL_i / num_tokens_i, ``num_groups``.
  """
  logq = _float(logprobs)
  same = _same_group(group_ids)
  w = _float(weights)
  n_tok = _float(num_tokens)
  for name, arr in (("q_prime_logprobs", q_prime_logprobs), ("weights", w), ("num_tokens", n_tok)):
    if jnp.shape(arr) != logq.shape:
      raise ValueError(f"{name} {jnp.shape(arr)} must match logprobs {logq.shape}")
  if logq.shape != same.shape[:1]:
    raise ValueError(f"group_ids {same.shape[:1]} must match logprobs {logq.shape}")
  m = jnp.ones_like(logq, dtype=bool) if sample_mask is None else jnp.asarray(sample_mask) > 0
  # Masked samples form groups of their own (so every softmax has a member) and are zeroed below.
  same = (same & m[:, None] & m[None, :]) | jnp.eye(same.shape[0], dtype=bool)
  mf = m.astype(logq.dtype)
  b = jax.lax.stop_gradient(_masked_group_softmax(logq - _float(q_prime_logprobs), same))
  samef = same.astype(logq.dtype)
  group_size = jnp.sum(samef, axis=-1)
  mean_tokens = jnp.maximum((samef @ n_tok) / group_size, 1.0)
  earlier = jnp.arange(same.shape[0])[None, :] < jnp.arange(same.shape[0])[:, None]
  first = ~jnp.any(same & earlier, axis=-1) & m  # the first member of each group
  num_groups = jnp.sum(first).astype(logq.dtype)
  groups = jnp.maximum(num_groups, 1.0)
  coef = jax.lax.stop_gradient(w - b) * mf
  total = jnp.sum(coef * (-logq) / mean_tokens) / groups
  wp, bp = w + DISTANCE_EPS, b + DISTANCE_EPS
  metrics = {
      "distance": jnp.sum(mf * wp * jnp.log(wp / bp)) / groups,
      "nll_per_token": jnp.sum(mf * -jax.lax.stop_gradient(logq) / jnp.maximum(n_tok, 1.0)) / jnp.maximum(
          jnp.sum(mf), 1.0),
      "num_groups": num_groups,
  }
  return total, metrics


def _masked_group_softmax(x, same):
  top = jax.lax.stop_gradient(jnp.max(jnp.where(same, x[None, :], -jnp.inf), axis=-1))
  e = jnp.exp(x[None, :] - top[:, None])
  return jnp.diagonal(e) / jnp.sum(jnp.where(same, e, 0.0), axis=-1)


def group_logprobs(model, batch):
  """``(logprobs, tokens)`` ``[R, n]``: each response's summed log-prob under ``model`` and its
  response-token count, for rows laid out by ``data.preference.group_row`` (response i is segment i+1)."""
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
  lp = token_logprobs(hidden, model.lm_head_kernel(), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  n = batch["sample_mask"].shape[-1]
  return (segment_sums(jnp.where(mask > 0, lp, 0.0), batch["segment_ids"], n),
          segment_sums(mask, batch["segment_ids"], n))


def train_loss(model, batch, rng=None):
  """``(loss_sum, groups, metric_sums)`` of a micro-batch of groups (one per row), for
  ``trainer.make_train_step``: the loss is the mean over all groups of the global batch.

  Besides ``loss``'s metrics: ``top_weight_accuracy``, the fraction of groups whose highest-weight
  response is also the one the model most prefers relative to the sampler (the argmax of the baseline).
  """
  del rng
  logq, num_tokens = group_logprobs(model, batch)
  rows, n = logq.shape
  group_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, n))
  real = batch["sample_mask"]
  value, metrics = loss(logq.reshape(-1), batch["q_prime"].reshape(-1), batch["weights"].reshape(-1),
                        group_ids.reshape(-1), num_tokens.reshape(-1), sample_mask=real.reshape(-1))
  groups = metrics.pop("num_groups")
  present = real > 0
  best_weight = jnp.argmax(jnp.where(present, batch["weights"], -jnp.inf), axis=1)
  best_model = jnp.argmax(jnp.where(present, logq - batch["q_prime"], -jnp.inf), axis=1)
  matches = jnp.sum((best_weight == best_model) & jnp.any(present, axis=1))
  sums = {k: v * groups for k, v in metrics.items()}
  sums["top_weight_accuracy"] = matches.astype(jnp.float32)
  return value * groups, groups, sums
