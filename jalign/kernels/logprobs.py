"""Token log-probs (and entropy) from hidden states and the output projection.

``token_logprobs(hidden [B,T,H], lm_head [H,V], targets [B,T])`` equals
``log_softmax(hidden @ lm_head)[targets]``. The XLA implementation walks the sequence in chunks
under ``jax.checkpoint`` so that only one ``[B, chunk, V]`` block of logits is alive at a time, in
the forward and in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas")
DEFAULT_CHUNK = 256


def _chunk_logprobs(hidden, lm_head, targets):
  logits = jnp.einsum("bth,hv->btv", hidden, lm_head, preferred_element_type=jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  probs = jnp.exp(logits - logz[..., None])
  entropy = logz - jnp.sum(probs * logits, axis=-1)
  return picked - logz, entropy


def token_logprobs_xla(hidden, lm_head, targets, *, return_entropy=False, chunk=DEFAULT_CHUNK):
  if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
    raise ValueError(f"hidden must be [B,T,H] and lm_head [H,V]; got {hidden.shape}, {lm_head.shape}")
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"targets {targets.shape} must be [B,T] = {hidden.shape[:2]}")
  b, t, h = hidden.shape
  targets = targets.astype(jnp.int32)
  if t <= chunk:
    lp, ent = _chunk_logprobs(hidden, lm_head, targets)
  else:
    n = -(-t // chunk)
    pad = n * chunk - t
    hid = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, h).swapaxes(0, 1)
    tgt = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda args: _chunk_logprobs(args[0], lm_head, args[1]))
    lp, ent = jax.lax.map(body, (hid, tgt))
    lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return (lp, ent) if return_entropy else lp


def token_logprobs(hidden, lm_head, targets, *, impl=None, return_entropy=False):
  """Log-probs ``[B,T]`` float32 of ``targets`` (and the softmax entropy with ``return_entropy``).

  ``impl``: "xla" (chunked, the default) or "pallas" (the fused kernel of ``logprobs_pallas``; in
  interpret mode on CPU, where it is for testing, not speed).
  """
  if impl is None:
    impl = "xla"
  if impl not in IMPLS:
    raise ValueError(f"unknown token_logprobs impl {impl!r}; available here: {IMPLS}")
  if impl == "pallas":
    from jalign.kernels.logprobs_pallas import token_logprobs_pallas
    return token_logprobs_pallas(hidden, lm_head, targets, return_entropy=return_entropy)
  return token_logprobs_xla(hidden, lm_head, targets, return_entropy=return_entropy)
