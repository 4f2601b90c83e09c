"""The gap between the rollout engine's log-probs and the trainer's, and its correction.

The engine samples a response and records each token's log-prob under the distribution it drew from;
the trainer then computes the same tokens' log-probs (``pi_old``) with its own program: other kernels,
another dtype, the KV cache or not. The two should agree, and silently do not when something is off (a
bf16 engine, a stale refit, a kernel bug). Per rollout, over the response tokens:

- ``logprob_gap_mean`` / ``logprob_gap_max``: the mean and largest ``|log pi_old - log pi_engine|``;
- ``logprob_gap_kl``: the k3 estimate of KL(engine || trainer) on the engine's own samples,
  ``E[exp(r) - 1 - r]`` with ``r = log pi_old - log pi_engine`` (never negative, 0 only where they agree).

Truncated importance sampling (TIS, as verl and OpenRLHF apply it) weights each token of the policy
loss by ``min(pi_old / pi_engine, cap)``: the loss is then an expectation under the trainer's policy
though the samples came from the engine's, with the weight capped to bound its variance. The weights
carry no gradient.

Arrays are ``[B,T]`` in the log-prob layout (column ``t`` scores token ``t+1``); ``mask`` marks the
response tokens. The engine's log-probs are its model's own softmax at the sampled tokens
(``Rollout.policy_logprobs``: before temperature, top-k, top-p and the stop-id suppression), what the
trainer computes for them, so that the gap is the two programs' alone.
"""

from __future__ import annotations

import numpy as np


def logprob_gap(engine, trainer, mask) -> dict:
  """``{"logprob_gap_mean", "logprob_gap_max", "logprob_gap_kl"}`` over the tokens under ``mask``
  (all 0 when it covers none)."""
  on = np.asarray(mask) > 0
  if not on.any():
    return {"logprob_gap_mean": 0.0, "logprob_gap_max": 0.0, "logprob_gap_kl": 0.0}
  r = (np.asarray(trainer, np.float64) - np.asarray(engine, np.float64))[on]
  return {"logprob_gap_mean": float(np.mean(np.abs(r))), "logprob_gap_max": float(np.max(np.abs(r))),
          "logprob_gap_kl": float(np.mean(np.expm1(r) - r))}


def tis_weights(engine, trainer, mask, cap: float) -> np.ndarray:
  """``[B,T]`` float32: ``min(exp(log pi_old - log pi_engine), cap)`` under ``mask``, 0 elsewhere."""
  if cap <= 0:
    raise ValueError(f"cap must be positive, got {cap}")
  r = np.asarray(trainer, np.float64) - np.asarray(engine, np.float64)
  return (np.minimum(np.exp(np.minimum(r, np.log(cap))), cap) * (np.asarray(mask) > 0)).astype(np.float32)
