"""REINFORCE with the leave-one-out (RLOO) baseline, as NeMo-Aligner computes it (§2.9).

Each prompt is sampled K times; the samples of one prompt share a ``group_id``. A sample's reward is
the reward model's score minus ``kl_coef`` x its sequence KL against the initial policy; its baseline
is the mean reward of the other samples of its group that ended with a stop token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses import sft


def baseline(rewards, group_ids, is_end) -> jax.Array:
  """``[B]``: for sample i, (sum of R_j over ended samples j != i of its group) / (ended in group - 1).

  A group with one or no ended sample gets each sample's own reward back (zero advantage).
  """
  rewards = jnp.asarray(rewards, float)
  ended = jnp.asarray(is_end, float)
  group_ids = jnp.asarray(group_ids)
  same = (group_ids[:, None] == group_ids[None, :]).astype(rewards.dtype)
  others = same * (1.0 - jnp.eye(rewards.shape[0], dtype=rewards.dtype))
  total = others @ (rewards * ended)
  count = same @ ended
  return jnp.where(count > 1, total / jnp.maximum(count - 1, 1.0), rewards)


def sequence_kl(old_logprobs, init_logprobs, mask, *, absolute_kl=True) -> jax.Array:
  """``[B]``: each row's masked mean of ``log pi_old - log pi_init`` (absolute values with ``absolute_kl``)."""
  mask = jnp.asarray(mask, float)
  kl = old_logprobs - init_logprobs
  if absolute_kl:
    kl = jnp.abs(kl)
  return jnp.sum(kl * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def loss(logprobs, rewards, baselines, mask):
  """``masked_mean(-logprobs * (R - b))`` over the response tokens; ``(loss, metrics)``."""
  mask = jnp.asarray(mask, float)
  advantages = jax.lax.stop_gradient(jnp.asarray(rewards) - jnp.asarray(baselines))
  value = jnp.sum(-logprobs * advantages[:, None] * mask) / jnp.maximum(jnp.sum(mask), 1e-9)
  return value, {"reinforce_loss": value, "advantages": jnp.mean(advantages)}


def token_logprobs_of(model, batch):
  """``{"token_logprobs": [B,T]}``: the model's log-probs of ``batch["targets"]`` (a reference pass's
  output, for the old and the initial policy)."""
  return {"token_logprobs": sft.target_logprobs(model, batch)}


def train_loss(model, batch, rng=None):
  """``(loss_sum, tokens, metric_sums)`` of a micro-batch of scored samples, for ``trainer.make_train_step``:
  the summed ``-log pi(t) * advantage`` over the response tokens ``loss_mask`` covers, so that the
  trainer's division gives the masked mean over the global batch. ``batch["advantages"]`` is ``[B]``;
  ``batch["tis_weights"]`` (with ``rollout.tis_cap``) weights each token (``jalign.losses.offpolicy``)."""
  del rng
  mask = batch["loss_mask"].astype(jnp.float32)
  lp = token_logprobs_of(model, batch)["token_logprobs"]
  advantages = jax.lax.stop_gradient(batch["advantages"].astype(jnp.float32))
  metrics = {"response_logprob": jnp.sum(lp * mask)}
  weighted = mask
  if "tis_weights" in batch:
    weighted = mask * jax.lax.stop_gradient(batch["tis_weights"].astype(jnp.float32))
    metrics["tis_weight"] = jnp.sum(weighted)
  total = jnp.sum(-lp * advantages[:, None] * weighted)
  return total, jnp.sum(mask), metrics
