"""PPO with a critic, as NeMo-Aligner computes it (its ``ppo_utils`` and PPO actor and critic losses).

Arrays are ``[B,T]`` in the log-prob layout: column ``t`` holds what predicts token ``t+1`` (the
log-prob of ``tokens[t+1]``, the value of the state after ``tokens[:t+1]``). A row with prompt length
``p`` and total length ``L`` (prompt + response, stop token included) has its actions at
``t in [p-1, L-1)``: ``response_mask`` gives that mask.

One PPO step's numbers, in order: ``rewards_with_kl`` (a per-token KL penalty against the initial
policy, the reward model's score added at the last action), ``gae`` (advantages and returns over the
whole padded row), ``whiten`` (advantages to zero mean and unit variance under the mask), then
``actor_loss`` (the clipped surrogate, on rows that ended with a stop token) and ``critic_loss`` (the
clipped value loss, on every row). ``actor_train_loss`` / ``critic_train_loss`` are the same losses in
the trainer's ``(sum, weight, metric_sums)`` form: a token-weighted mean over the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.kernels import token_logprobs


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1e-9)


def response_mask(prompt_lengths, lengths, width: int) -> jax.Array:
  """``[B,width]`` float32, 1 at the actions ``t in [p-1, L-1)`` of each row."""
  t = jnp.arange(width)[None]
  p = jnp.asarray(prompt_lengths)[:, None]
  end = jnp.asarray(lengths)[:, None]
  return ((t >= p - 1) & (t < end - 1)).astype(jnp.float32)


def rewards_with_kl(scores, old_logprobs, init_logprobs, mask, *, kl_coef=0.01, absolute_kl=True):
  """Per-token rewards ``[B,T]``: ``-kl_coef * k_t`` under the mask, plus ``scores`` ``[B]`` at each
  row's last action. ``k_t = log pi_old - log pi_init`` (its absolute value with ``absolute_kl``).
  Returns ``(rewards, kl)`` with ``kl`` the masked per-token ``k_t``."""
  mask = jnp.asarray(mask, float)
  kl = (old_logprobs - init_logprobs) * mask
  if absolute_kl:
    kl = jnp.abs(kl)
  width = mask.shape[1]
  # The last action: the last column under the mask (column 0 for a row without any).
  last = width - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
  last = jnp.where(jnp.any(mask > 0, axis=1), last, 0)
  at_last = jax.nn.one_hot(last, width, dtype=mask.dtype)
  rewards = -kl_coef * kl + at_last * jnp.asarray(scores, float)[:, None]
  return rewards, kl


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
  """Generalised advantage estimation over each whole row: ``(advantages, returns)`` ``[B,T]``.

  Rewards and values are masked first, so values past the last action count as 0:
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``R_t = A_t + V_t``.
  """
  mask = jnp.asarray(mask, float)
  rewards = jnp.asarray(rewards, float) * mask
  values = jnp.asarray(values, float) * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def back(advantage, delta):
    advantage = delta + gamma * lam * advantage
    return advantage, advantage

  _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0]), deltas.T, reverse=True)
  advantages = advantages.T
  return advantages, advantages + values


def whiten(x, mask, *, eps=1e-8):
  """``(x - mean) / sqrt(var + eps)`` with the mean and (biased) variance taken under ``mask``."""
  mask = jnp.asarray(mask, float)
  mean = _masked_mean(x, mask)
  var = _masked_mean((x - mean) ** 2, mask)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def actor_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, entropy=None, entropy_coef=0.0,
               weights=None):
  """The clipped surrogate ``masked_mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` minus
  ``entropy_coef`` x the masked mean ``entropy``; ``r = exp(logprobs - old_logprobs)``. ``weights``
  (``[B,T]``, no gradient): each token's surrogate times its importance weight
  (``jalign.losses.offpolicy.tis_weights``).

  The caller folds ``is_end`` into ``mask`` (NeMo: truncated responses give no actor gradient); a
  mask with no tokens gives a loss of 0. Returns ``(loss, metrics)``.
  """
  mask = jnp.asarray(mask, float)
  ratio = jnp.exp(logprobs - old_logprobs)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate = jnp.maximum(-advantages * ratio, -advantages * clipped)
  if weights is not None:
    surrogate = surrogate * jax.lax.stop_gradient(weights)
  loss = _masked_mean(surrogate, mask)
  metrics = {"ppo_ratio": _masked_mean(ratio, mask), "ppo_ratio_clamped": _masked_mean(clipped, mask),
             "clip_fraction": _masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(mask.dtype), mask),
             "policy_loss": loss}
  if weights is not None:
    metrics["tis_weight"] = _masked_mean(weights, mask)
  if entropy is not None:
    mean_entropy = _masked_mean(entropy, mask)
    loss = loss - entropy_coef * mean_entropy
    metrics["entropy"] = mean_entropy
  return loss, metrics


def critic_loss(values, old_values, returns, mask, *, clip=0.2):
  """``0.5 masked_mean(max((V_clip - R)^2, (V - R)^2))`` with ``V_clip = V_old + clip(V - V_old, -c, c)``
  (no clipping when ``clip`` <= 0). Returns ``(loss, metrics)``."""
  mask = jnp.asarray(mask, float)
  error = (values - returns) ** 2
  if clip > 0:
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    error = jnp.maximum((clipped - returns) ** 2, error)
  loss = 0.5 * _masked_mean(error, mask)
  return loss, {"critic_loss": loss, "values": _masked_mean(values, mask)}


def actor_train_loss(model, batch, rng=None, *, clip_eps=0.2, entropy_coef=0.0):
  """``(loss_sum, tokens, metric_sums)`` of a micro-batch for ``trainer.make_train_step``.

  The batch holds ``tokens``, ``targets`` (tokens shifted left), ``mask`` (actions of rows that ended,
  ``is_end`` folded in), ``old_logprobs`` and ``advantages``, all ``[B,T]``, and with ``rollout.tis_cap``
  the tokens' importance weights ``tis_weights``.
  """
  del rng
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  out = token_logprobs(hidden, model.lm_head_kernel(), batch["targets"], return_entropy=entropy_coef > 0)
  logprobs, entropy = out if entropy_coef > 0 else (out, None)
  loss, metrics = actor_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["mask"],
                             clip_eps=clip_eps, entropy=entropy, entropy_coef=entropy_coef,
                             weights=batch.get("tis_weights"))
  tokens = jnp.sum(batch["mask"].astype(jnp.float32))
  return loss * tokens, tokens, {k: v * tokens for k, v in metrics.items()}


def critic_train_loss(model, batch, rng=None, *, clip=0.2):
  """``(loss_sum, tokens, metric_sums)`` for a ``ValueModel`` critic (its outputs merged into one value
  per token, as ``ValueModel.values`` reads a reward model); the batch holds ``tokens``,
  ``mask`` (every row's actions), ``old_values`` and ``returns``, all ``[B,T]``."""
  del rng
  values = model.values(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  loss, metrics = critic_loss(values, batch["old_values"], batch["returns"], batch["mask"], clip=clip)
  tokens = jnp.sum(batch["mask"].astype(jnp.float32))
  return loss * tokens, tokens, {k: v * tokens for k, v in metrics.items()}
