"""Supervised fine-tuning: next-token NLL over the target tokens the loss mask covers.

The loss is a token-weighted mean over the whole global batch (not a mean of per-micro-batch means),
so packing, padding and the micro-batch split do not change it. ``loss`` returns the pieces the
trainer adds up over micro-batches: the summed NLL and the number of covered tokens.
"""

from __future__ import annotations

import jax.numpy as jnp

from jalign.kernels import token_logprobs


def target_logprobs(model, batch):
  """Per-token log-probs ``[B,T]`` of ``batch["targets"]`` (without materialising the logits)."""
  hidden = model.hidden_states(batch["tokens"], positions=batch.get("positions"),
                               segment_ids=batch.get("segment_ids"))
  return token_logprobs(hidden, model.lm_head_kernel(), batch["targets"])


def token_nll(model, batch):
  """Per-token NLL ``[B,T]`` of ``batch["targets"]``."""
  return -target_logprobs(model, batch)


def loss(model, batch, rng=None):
  """``(nll_sum, token_count, metric_sums)`` for one micro-batch."""
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = token_nll(model, batch) * mask
  total = jnp.sum(nll)
  count = jnp.sum(mask)
  return total, count, {"nll": total}
