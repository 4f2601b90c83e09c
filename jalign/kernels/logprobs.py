"""Token log-probs (and entropy) from hidden states and the output projection.

``token_logprobs(hidden [B,T,H], lm_head [H,V], targets [B,T])`` equals
``log_softmax(hidden @ lm_head)[targets]``. The XLA implementation computes small problems (up to
``PLAIN_MAX_LOGITS_BYTES`` of logits) whole, with plain autodiff; larger ones it walks by rows (B*T
flattened) in chunks so that only a ``[chunk, V]`` block of logits is alive at a time. Its custom backward
walks the vocabulary instead, in blocks of ``VOCAB_CHUNK`` columns: for each block it recomputes
those logits for all rows, writes that block of the LM-head gradient in place and adds the block's
share to the (small) hidden-state gradient. The formulas are the Pallas kernel's (``logprobs_pallas``).

Tensor parallelism: when the active mesh shards the LM head's vocabulary over ``tensor``,
``token_logprobs`` runs each implementation inside ``shard_map`` on its vocabulary shard and combines
the shards' log-normalisers, target logits and entropies with a max and two sums over ``tensor``;
nothing of size V crosses devices and no device holds more than ``[chunk, V / tensor]`` logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "pallas")
DEFAULT_CHUNK = 256  # rows of B*T per block of logits in the forward pass
VOCAB_CHUNK = 2048   # vocabulary columns per block in the backward pass
# Up to this many bytes of float32 logits the XLA implementation computes them whole, with plain
# autodiff (one matmul fewer in the backward); above, in chunks with the recomputing backward.
PLAIN_MAX_LOGITS_BYTES = 128 * 2**20


def _chunk_stats(h, w, targets, with_entropy):
  """Log-probs, entropies (zeros unless ``with_entropy``) and log-normalisers of one ``[rows, H]`` chunk."""
  logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  if not with_entropy:  # saves a pass over the [rows, V] block
    return picked - logz, jnp.zeros_like(logz), logz
  logp = logits - logz[:, None]  # not logz - E[logits]: that difference of large numbers loses digits
  return picked - logz, -jnp.sum(jnp.exp(logp) * logp, axis=-1), logz


def _chunks(x, chunk):
  n = -(-x.shape[0] // chunk)
  x = jnp.pad(x, [(0, n * chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(n, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(hidden, lm_head, targets, chunk, vocab_chunk, with_entropy):
  return _chunked_fwd(hidden, lm_head, targets, chunk, vocab_chunk, with_entropy)[0]


def _chunked_fwd(hidden, lm_head, targets, chunk, vocab_chunk, with_entropy):
  rows = hidden.shape[0]
  lp, ent, logz = jax.lax.map(lambda a: _chunk_stats(a[0], lm_head, a[1], with_entropy),
                              (_chunks(hidden, chunk), _chunks(targets, chunk)))
  lp, ent, logz = (x.reshape(-1)[:rows] for x in (lp, ent, logz))
  return (lp, ent, logz), (hidden, lm_head, targets, logz, ent)


def _chunked_bwd(chunk, vocab_chunk, with_entropy, residuals, grads):
  del chunk
  hidden, lm_head, targets, logz, ent = residuals
  g_lp, g_ent, g_logz = grads
  vocab = lm_head.shape[1]
  width = min(vocab_chunk or VOCAB_CHUNK, vocab)
  full_blocks, tail = divmod(vocab, width)
  # The logits' cotangent meets the matmuls in the inputs' dtype (bf16 inputs: bf16 operands, float32
  # accumulation), as in plain autodiff of a bf16 matmul; float32 matmuls run at a fraction of the speed.
  operand_dtype = jnp.promote_types(hidden.dtype, lm_head.dtype)

  def block(w, start):
    """This block's share of the hidden-state gradient, and its columns of the LM-head gradient."""
    # log p - log p's expectation = (logits - logz) + entropy; working from the normalised log-probs
    # keeps the large logz out of the float32 differences.
    logp = jnp.dot(hidden, w, preferred_element_type=jnp.float32) - logz[:, None]
    p = jnp.exp(logp)
    is_target = (start + jnp.arange(w.shape[1]))[None, :] == targets[:, None]
    dx = jnp.where(is_target, g_lp[:, None], 0.0) + (g_logz - g_lp)[:, None] * p
    if with_entropy:
      dx = dx - g_ent[:, None] * p * (logp + ent[:, None])
    dx = dx.astype(operand_dtype)
    dh = jax.lax.dot_general(dx, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(hidden, dx, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dh, dw.astype(lm_head.dtype)

  def body(c, carry):
    dh, dw = carry
    start = c * width
    dh_block, dw_block = block(jax.lax.dynamic_slice_in_dim(lm_head, start, width, axis=1), start)
    return dh + dh_block, jax.lax.dynamic_update_slice_in_dim(dw, dw_block, start, axis=1)

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(lm_head.shape, lm_head.dtype))
  dh, dw = jax.lax.fori_loop(0, full_blocks, body, init)
  if tail:  # the ragged last block, outside the loop so that every block in it has one width
    dh_block, dw_block = block(lm_head[:, vocab - tail:], vocab - tail)
    dh, dw = dh + dh_block, dw.at[:, vocab - tail:].set(dw_block)
  return dh.astype(hidden.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_xla(hidden, lm_head, targets, *, return_entropy=False, chunk=DEFAULT_CHUNK, vocab_chunk=None):
  """``chunk``: rows per block of logits in the forward; ``vocab_chunk``: columns per block in the
  backward (default ``VOCAB_CHUNK``)."""
  if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
    raise ValueError(f"hidden must be [B,T,H] and lm_head [H,V]; got {hidden.shape}, {lm_head.shape}")
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"targets {targets.shape} must be [B,T] = {hidden.shape[:2]}")
  b, t, h = hidden.shape
  rows, flat_targets = hidden.reshape(b * t, h), targets.reshape(b * t).astype(jnp.int32)
  if b * t * lm_head.shape[1] * 4 <= PLAIN_MAX_LOGITS_BYTES:
    # Small enough to hold: plain autodiff keeps the logits and saves the backward's recomputation.
    lp, ent, logz = _chunk_stats(rows, lm_head, flat_targets, bool(return_entropy))
  else:
    lp, ent, logz = _chunked(rows, lm_head, flat_targets, chunk, vocab_chunk, bool(return_entropy))
  lp, ent, logz = lp.reshape(b, t), ent.reshape(b, t), logz.reshape(b, t)
  if return_entropy == "with_logz":
    return lp, ent, logz
  return (lp, ent) if return_entropy else lp


def _implementation(impl):
  if impl == "pallas":
    from jalign.kernels.logprobs_pallas import token_logprobs_pallas
    return token_logprobs_pallas
  return token_logprobs_xla


def token_logprobs_vocab_sharded(hidden, lm_head, targets, *, axis="tensor", impl="xla", return_entropy=False):
  """``token_logprobs`` with the LM head's vocabulary sharded over mesh ``axis`` of the active mesh.

  Each device computes its shard's log-normaliser ``z_i``, its log-prob of the target when the target
  is in its shard, and its shard's entropy; then ``z = log sum_i exp(z_i)``, the target logit is the
  one shard's ``lp_i + z_i``, and the entropy is ``z - sum_i exp(z_i - z) (z_i - entropy_i)``. Only the
  other mesh axes stay automatic, so the batch keeps its data/fsdp sharding.
  """
  local = _implementation(impl)
  dtype = hidden.dtype

  def per_shard(h, w, t):
    h = h.astype(dtype)
    v_local = w.shape[1]
    start = jax.lax.axis_index(axis) * v_local
    t_local = t - start
    inside = (t_local >= 0) & (t_local < v_local)
    lp_i, ent_i, z_i = local(h, w, jnp.clip(t_local, 0, v_local - 1), return_entropy="with_logz")
    top = jax.lax.pmax(jax.lax.stop_gradient(z_i), axis)  # cancels out of the value; only for range
    z = top + jnp.log(jax.lax.psum(jnp.exp(z_i - top), axis))
    lp = jax.lax.psum(jnp.where(inside, lp_i + z_i, 0.0), axis) - z
    expectation = jax.lax.psum(jnp.exp(z_i - z) * (z_i - ent_i), axis)
    return lp, z - expectation

  # check_vma=False: Pallas calls inside shard_map carry no varying-axes annotations in this JAX.
  # The hidden states enter in float32 so that the gradient's sum over shards is a float32 psum: more
  # accurate than a bf16 one, and XLA's CPU compiler fails on bf16 all-reduces made here.
  lp, ent = jax.shard_map(per_shard, in_specs=(P(), P(None, axis), P()), out_specs=(P(), P()),
                          axis_names={axis}, check_vma=False)(hidden.astype(jnp.float32), lm_head, targets)
  return (lp, ent) if return_entropy else lp


def _tensor_parallel_size(axis="tensor") -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    return 1
  return mesh.shape[axis]


def token_logprobs(hidden, lm_head, targets, *, impl=None, return_entropy=False):
  """Log-probs ``[B,T]`` float32 of ``targets`` (and the softmax entropy with ``return_entropy``).

  ``impl``: "xla" (chunked; the default on every backend: on an H100 it beats the Pallas kernel,
  bench/RESULTS.md) or "pallas" (the fused kernel of ``logprobs_pallas``; interpret mode on CPU).
  Under a mesh whose ``tensor`` axis is larger than 1 (and divides V), each device works on its
  vocabulary shard (``token_logprobs_vocab_sharded``).
  """
  if impl is None:
    impl = "xla"
  if impl not in IMPLS:
    raise ValueError(f"unknown token_logprobs impl {impl!r}; available here: {IMPLS}")
  if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
    raise ValueError(f"hidden must be [B,T,H] and lm_head [H,V]; got {hidden.shape}, {lm_head.shape}")
  tp = _tensor_parallel_size()
  if tp > 1 and lm_head.shape[1] % tp == 0:
    return token_logprobs_vocab_sharded(hidden, lm_head, targets, impl=impl, return_entropy=return_entropy)
  return _implementation(impl)(hidden, lm_head, targets, return_entropy=return_entropy)
