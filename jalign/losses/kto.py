"""KTO (Ethayarajh et al. 2024) as NeMo-Aligner runs it: unpaired desirable/undesirable feedback.

Each sample is a (prompt, response) with a binary label. The loss compares the sample's log-ratio
rho = log pi(y|x) - log pi_ref(y|x) with a reference point z_ref, an estimate of KL(pi || pi_ref) made
from *mismatched* pairs: sample i's prompt with another sample's response (``mismatched_pairs``), whose
log-ratios the caller passes as ``policy_kl`` / ``ref_kl``.

    z_ref = stop_gradient(max(0, mean(policy_kl - ref_kl)))
    desirable:   w_d * (1 - sigma(beta (rho - z_ref)))
    undesirable: w_u * (1 - sigma(beta (z_ref - rho)))
    loss = mean over all samples

z_ref gets no gradient, as in NeMo and TRL. NeMo clamps the mean of each micro-batch and then averages
over data-parallel ranks; here the mean is over whatever KL batch the caller passes (the whole global
batch in one program), then clamped, which is TRL's order. NeMo's KTO ``sft_loss_weight`` is never
applied there, so it has no counterpart here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import sigmoid

from jalign.losses import dpo


def _float(x):
  """``x`` as a jnp array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mismatched_pairs(n):
  """Permutation ``perm [n]`` with ``perm[i] = (i + 1) % n``: KL sample i is prompt i + response perm[i].

  This is NeMo's KTO collate (response of the next sample in the batch, wrapping around). With n = 1 the
  only sample is paired with itself, so its KL estimate is its own log-ratio.
  """
  if n < 1:
    raise ValueError(f"mismatched_pairs needs n >= 1, got {n}")
  return np.roll(np.arange(n, dtype=np.int32), -1)


def reference_point(policy_kl, ref_kl, weights=None):
  """z_ref = max(0, mean(policy_kl - ref_kl)), detached (a ``weights``-weighted mean when given)."""
  diff = _float(policy_kl) - _float(ref_kl)
  if weights is None:
    kl = jnp.mean(diff)
  else:
    w = _float(weights).astype(diff.dtype)
    kl = jnp.sum(w * diff) / jnp.maximum(jnp.sum(w), 1e-9)
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def _masked_mean(x, m):
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(x.dtype)


def loss(policy, ref, policy_kl, ref_kl, desirable, *, beta=0.2, desirable_weight=1.0,
         undesirable_weight=1.0, weights=None):
  """KTO loss over ``[B]`` per-sequence log-probs; returns ``(loss, metrics)``.

  ``policy`` / ``ref``: log-probs of each sample's own response; ``policy_kl`` / ``ref_kl``: of the
  mismatched KL samples; ``desirable``: bool ``[B]``. Metrics: ``kl`` (z_ref),
  ``rewards_chosen_mean`` / ``rewards_rejected_mean`` (beta * rho over the desirable / undesirable
  samples, 0 when there are none), ``rewards_all_mean``, ``rewards_all_std`` (uncorrected) and
  ``desirable_fraction``. ``weights`` ``[B]`` (default all 1) weight the samples in the loss, the
  reference point and the metrics; 0 marks padding.
  """
  if isinstance(beta, (int, float)) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  pi, rf = _float(policy), _float(ref)
  if pi.shape != rf.shape:
    raise ValueError(f"policy {pi.shape} and ref {rf.shape} must have the same shape")
  d = jnp.asarray(desirable)
  if d.shape != pi.shape:
    raise ValueError(f"desirable {d.shape} must match the log-probs {pi.shape}")
  d = d.astype(bool)
  if jnp.shape(policy_kl) != jnp.shape(ref_kl):
    raise ValueError(f"policy_kl {jnp.shape(policy_kl)} and ref_kl {jnp.shape(ref_kl)} must match")
  w = jnp.ones_like(pi) if weights is None else _float(weights).astype(pi.dtype)
  if w.shape != pi.shape:
    raise ValueError(f"weights {w.shape} must match the log-probs {pi.shape}")
  z = reference_point(policy_kl, ref_kl, None if weights is None else w)
  rho = pi - rf
  per_sample = jnp.where(d, desirable_weight * (1.0 - sigmoid(beta * (rho - z))),
                         undesirable_weight * (1.0 - sigmoid(beta * (z - rho))))
  mean = lambda x: jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-9)
  total = mean(per_sample)
  rewards = beta * rho
  all_mean = mean(rewards)
  real = w > 0
  metrics = {
      "kl": z,
      "rewards_chosen_mean": _masked_mean(rewards, d & real),
      "rewards_rejected_mean": _masked_mean(rewards, ~d & real),
      "rewards_all_mean": all_mean,
      "rewards_all_std": jnp.sqrt(jnp.maximum(mean(rewards ** 2) - all_mean ** 2, 0.0)),
      "desirable_fraction": mean(d.astype(total.dtype)),
  }
  return total, metrics


# ----------------------------------------------------------------------------------------------
# On a model: the pieces the shared training loop calls
# ----------------------------------------------------------------------------------------------


def train_loss(model, batch, rng=None, *, beta=0.2, desirable_weight=1.0, undesirable_weight=1.0):
  """``(loss_sum, samples, metric_sums)`` of a micro-batch for ``trainer.make_train_step``.

  Rows hold slots of (sample, KL sample) as segments 2p+1 and 2p+2 (``data.preference.feedback_row``)
  with ``desirable`` and ``pair_mask`` per slot; the reference pass (``dpo.reference_logprobs``, the
  same function) adds ``ref_chosen`` (the samples) and ``ref_rejected`` (the KL samples). The
  reference point is estimated from this micro-batch's KL samples, as NeMo-Aligner does.
  """
  del rng
  policy, policy_kl = dpo.pair_logprobs(model, batch)
  real = batch["pair_mask"].reshape(-1)
  value, metrics = loss(policy, batch["ref_chosen"].reshape(-1), policy_kl, batch["ref_rejected"].reshape(-1),
                        batch["desirable"].reshape(-1) > 0, beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, weights=real)
  samples = jnp.sum(real)
  return value * samples, samples, {k: v * samples for k, v in metrics.items()}
