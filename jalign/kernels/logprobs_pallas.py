"""Fused token log-prob and entropy as Pallas kernels: logits exist only one block at a time.

Rows (flattened B*T) are split into blocks of ``block_rows``; each program walks the vocabulary in
blocks of ``block_vocab`` keeping an online log-sum-exp (running max ``m``, ``l = sum exp(x - m)``,
``a = sum exp(x - m) * x`` for the entropy) and picks the target's logit when its block passes.

Backward, with ``p = softmax(x)`` and ``E = sum p x = logZ - entropy``:
  d logprob / d x_j = [j == target] - p_j;     d entropy / d x_j = -p_j (x_j - E)
so ``dx = g_lp * (onehot - p) - g_ent * p * (x - E)``, recomputed block by block: one kernel over row
blocks gives ``d hidden = dx @ W^T``, one over vocabulary blocks gives ``d W = hidden^T @ dx``.

Block shapes are powers of two (what Triton needs): H is zero-padded to a power of two, rows and
vocabulary to multiples of their blocks; padded vocabulary columns are masked out. On CPU the
kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jalign.kernels.padding import pad_to_multiple

_NEG = -1e30


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _logits(h, w, vocab_start, vocab_size):
  x = jnp.dot(h, w, preferred_element_type=jnp.float32)
  cols = vocab_start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(cols < vocab_size, x, _NEG), cols


def _forward_kernel(h_ref, w_ref, t_ref, lp_ref, ent_ref, lse_ref, *, block_vocab, vocab_size):
  h = h_ref[...]
  targets = t_ref[...]
  rows = h.shape[0]
  num_blocks = w_ref.shape[1] // block_vocab

  def body(j, carry):
    m, l, a, picked = carry
    w = w_ref[:, pl.ds(j * block_vocab, block_vocab)]
    x, cols = _logits(h, w, j * block_vocab, vocab_size)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(x - m_new[:, None])
    l = l * scale + jnp.sum(e, axis=1)
    a = a * scale + jnp.sum(e * jnp.where(cols < vocab_size, x, 0.0), axis=1)
    picked = picked + jnp.sum(jnp.where(cols == targets[:, None], x, 0.0), axis=1)
    return m_new, l, a, picked

  zeros = jnp.zeros((rows,), jnp.float32)
  m, l, a, picked = jax.lax.fori_loop(0, num_blocks, body, (zeros + _NEG, zeros, zeros, zeros))
  lse = m + jnp.log(l)
  lp_ref[...] = picked - lse
  ent_ref[...] = lse - a / l
  lse_ref[...] = lse


def _dx(h, w, targets, lse, entropy, g_lp, g_ent, vocab_start, vocab_size):
  x, cols = _logits(h, w, vocab_start, vocab_size)
  p = jnp.exp(x - lse[:, None])
  expectation = (lse - entropy)[:, None]
  onehot = (cols == targets[:, None]).astype(jnp.float32)
  x_safe = jnp.where(cols < vocab_size, x, 0.0)
  return g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (x_safe - expectation)


def _dhidden_kernel(h_ref, w_ref, t_ref, lse_ref, ent_ref, glp_ref, gent_ref, dh_ref, *, block_vocab, vocab_size):
  h = h_ref[...]
  num_blocks = w_ref.shape[1] // block_vocab

  def body(j, acc):
    w = w_ref[:, pl.ds(j * block_vocab, block_vocab)]
    dx = _dx(h, w, t_ref[...], lse_ref[...], ent_ref[...], glp_ref[...], gent_ref[...], j * block_vocab, vocab_size)
    return acc + jnp.dot(dx, w.T.astype(jnp.float32), preferred_element_type=jnp.float32)

  dh_ref[...] = jax.lax.fori_loop(0, num_blocks, body, jnp.zeros(dh_ref.shape, jnp.float32)).astype(dh_ref.dtype)


def _dweight_kernel(h_ref, w_ref, t_ref, lse_ref, ent_ref, glp_ref, gent_ref, dw_ref, *, block_rows, block_vocab,
                    vocab_size):
  vocab_start = pl.program_id(0) * block_vocab
  w = w_ref[...]
  num_blocks = h_ref.shape[0] // block_rows

  def body(i, acc):
    rows = pl.ds(i * block_rows, block_rows)
    h = h_ref[rows, :]
    dx = _dx(h, w, t_ref[rows], lse_ref[rows], ent_ref[rows], glp_ref[rows], gent_ref[rows], vocab_start, vocab_size)
    return acc + jnp.dot(h.T.astype(jnp.float32), dx, preferred_element_type=jnp.float32)

  dw_ref[...] = jax.lax.fori_loop(0, num_blocks, body, jnp.zeros(dw_ref.shape, jnp.float32)).astype(dw_ref.dtype)


def _prepare(hidden, lm_head, targets, block_rows, block_vocab):
  h = pad_to_multiple(pad_to_multiple(hidden, 1, pl.next_power_of_2(hidden.shape[1])), 0, block_rows)
  w = pad_to_multiple(pad_to_multiple(lm_head, 0, h.shape[1]), 1, block_vocab)
  t = pad_to_multiple(targets.astype(jnp.int32), 0, block_rows)
  return h, w, t


def _row_spec(block_rows, *cols):
  return pl.BlockSpec((block_rows, *cols), lambda i: (i,) + (0,) * len(cols))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(hidden, lm_head, targets, block_rows, block_vocab):
  return _fused_fwd(hidden, lm_head, targets, block_rows, block_vocab)[0]


def _fused_fwd(hidden, lm_head, targets, block_rows, block_vocab):
  n, vocab = hidden.shape[0], lm_head.shape[1]
  h, w, t = _prepare(hidden, lm_head, targets, block_rows, block_vocab)
  rows = h.shape[0]
  out = jax.ShapeDtypeStruct((rows,), jnp.float32)
  lp, ent, lse = pl.pallas_call(
      functools.partial(_forward_kernel, block_vocab=block_vocab, vocab_size=vocab),
      grid=(rows // block_rows,),
      in_specs=[_row_spec(block_rows, h.shape[1]), pl.BlockSpec(w.shape, lambda i: (0, 0)), _row_spec(block_rows)],
      out_specs=[_row_spec(block_rows)] * 3, out_shape=[out, out, out], interpret=_interpret(),
  )(h, w, t)
  return (lp[:n], ent[:n]), (hidden, lm_head, targets, lse[:n], ent[:n])


def _fused_bwd(block_rows, block_vocab, residuals, grads):
  hidden, lm_head, targets, lse, entropy = residuals
  g_lp, g_ent = grads
  n, vocab = hidden.shape[0], lm_head.shape[1]
  h, w, t = _prepare(hidden, lm_head, targets, block_rows, block_vocab)
  rows = h.shape[0]
  per_row = [pad_to_multiple(x.astype(jnp.float32), 0, block_rows) for x in (lse, entropy, g_lp, g_ent)]
  dh = pl.pallas_call(
      functools.partial(_dhidden_kernel, block_vocab=block_vocab, vocab_size=vocab),
      grid=(rows // block_rows,),
      in_specs=[_row_spec(block_rows, h.shape[1]), pl.BlockSpec(w.shape, lambda i: (0, 0))]
      + [_row_spec(block_rows)] * 5,
      out_specs=_row_spec(block_rows, h.shape[1]), out_shape=jax.ShapeDtypeStruct(h.shape, hidden.dtype),
      interpret=_interpret(),
  )(h, w, t, *per_row)
  whole_rows = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  dw = pl.pallas_call(
      functools.partial(_dweight_kernel, block_rows=block_rows, block_vocab=block_vocab, vocab_size=vocab),
      grid=(w.shape[1] // block_vocab,),
      in_specs=[whole_rows(*h.shape), pl.BlockSpec((w.shape[0], block_vocab), lambda j: (0, j))]
      + [whole_rows(rows)] * 5,
      out_specs=pl.BlockSpec((w.shape[0], block_vocab), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct(w.shape, lm_head.dtype), interpret=_interpret(),
  )(h, w, t, *per_row)
  return dh[:n, :hidden.shape[1]], dw[:lm_head.shape[0], :vocab], None


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs_pallas(hidden, lm_head, targets, *, return_entropy=False, block_rows=16, block_vocab=128):
  """``[B,T]`` log-probs (and entropies) of ``targets`` under ``softmax(hidden @ lm_head)``."""
  b, t, h = hidden.shape
  lp, ent = _fused(hidden.reshape(b * t, h), lm_head, targets.reshape(b * t), block_rows, block_vocab)
  lp, ent = lp.reshape(b, t), ent.reshape(b, t)
  return (lp, ent) if return_entropy else lp
