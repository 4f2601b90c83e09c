"""Fused token log-prob and entropy as Pallas kernels: logits exist only one block at a time.

Rows (flattened B*T) are split into blocks of ``block_rows``; each program walks the vocabulary in
blocks of ``block_vocab`` keeping an online log-sum-exp (running max ``m``, ``l = sum exp(x - m)``,
``a = sum exp(x - m) * x`` for the entropy) and picks the target's logit when its block passes.

Backward, with ``p = softmax(x)`` and ``E = sum p x = logZ - entropy``:
  d logprob / d x_j = [j == target] - p_j;     d entropy / d x_j = -p_j (x_j - E)
so ``dx = g_lp * (onehot - p) - g_ent * p * (x - E)``, recomputed block by block: one kernel over row
blocks gives ``d hidden = dx @ W^T``, one over vocabulary blocks gives ``d W = hidden^T @ dx``.

Every matmul is tiled over the hidden size too (``block_hidden``), so no tile holds a whole
``[rows, H]`` or ``[H, block_vocab]`` slab: the GPU's registers and shared memory hold tiles, not
rows of a 2k-8k hidden size. The backward accumulates its float32 gradients in the output blocks,
hidden block by hidden block (each program owns its rows or columns, so there are no races).

Block shapes are powers of two (what Triton needs): H, rows and vocabulary are zero-padded to
multiples of their blocks; padded vocabulary columns are masked out. On CPU the kernels run in
Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jalign.kernels.padding import compiler_params, interpret, pad_to_multiple

_NEG = -1e30


def _logits(h_ref, w_ref, rows, vocab_start, block_vocab, block_hidden, vocab_size):
  """One ``[rows, block_vocab]`` tile of logits, summed over the hidden size in blocks (so no tile
  holds a whole ``[rows, H]`` or ``[H, block_vocab]`` slab), with padded columns masked."""
  cols_slice = pl.ds(vocab_start, block_vocab)

  def body(k, x):
    hk = pl.ds(k * block_hidden, block_hidden)
    return x + jnp.dot(h_ref[rows, hk], w_ref[hk, cols_slice], preferred_element_type=jnp.float32)

  x = jax.lax.fori_loop(0, w_ref.shape[0] // block_hidden, body, jnp.zeros((rows.size, block_vocab), jnp.float32))
  cols = vocab_start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(cols < vocab_size, x, _NEG), cols


def _forward_kernel(h_ref, w_ref, t_ref, lp_ref, ent_ref, lse_ref, *, block_vocab, block_hidden, vocab_size):
  targets = t_ref[...]
  rows = pl.ds(0, h_ref.shape[0])
  num_blocks = w_ref.shape[1] // block_vocab

  def body(j, carry):
    m, l, a, picked = carry
    x, cols = _logits(h_ref, w_ref, rows, j * block_vocab, block_vocab, block_hidden, vocab_size)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(x - m_new[:, None])
    l = l * scale + jnp.sum(e, axis=1)
    a = a * scale + jnp.sum(e * jnp.where(cols < vocab_size, x, 0.0), axis=1)
    picked = picked + jnp.sum(jnp.where(cols == targets[:, None], x, 0.0), axis=1)
    return m_new, l, a, picked

  zeros = jnp.zeros((h_ref.shape[0],), jnp.float32)
  m, l, a, picked = jax.lax.fori_loop(0, num_blocks, body, (zeros + _NEG, zeros, zeros, zeros))
  lse = m + jnp.log(l)
  lp_ref[...] = picked - lse
  ent_ref[...] = lse - a / l
  lse_ref[...] = lse


def _dx(x, cols, targets, lse, entropy, g_lp, g_ent, g_lse, vocab_size):
  p = jnp.exp(x - lse[:, None])
  expectation = (lse - entropy)[:, None]
  onehot = (cols == targets[:, None]).astype(jnp.float32)
  x_safe = jnp.where(cols < vocab_size, x, 0.0)
  return g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (x_safe - expectation) + g_lse[:, None] * p


def _dhidden_kernel(h_ref, w_ref, t_ref, lse_ref, ent_ref, glp_ref, gent_ref, glse_ref, dh_ref, *, block_vocab, block_hidden,
                    vocab_size):
  # dh (float32, this program's rows only) is accumulated in the output block, one hidden block at a
  # time, because a whole [rows, H] accumulator would not fit in registers.
  rows = pl.ds(0, h_ref.shape[0])
  per_row = [r[...] for r in (t_ref, lse_ref, ent_ref, glp_ref, gent_ref, glse_ref)]

  def over_vocab(j, _):
    x, cols = _logits(h_ref, w_ref, rows, j * block_vocab, block_vocab, block_hidden, vocab_size)
    dx = _dx(x, cols, *per_row, vocab_size)

    def over_hidden(k, _):
      hk = pl.ds(k * block_hidden, block_hidden)
      w = w_ref[hk, pl.ds(j * block_vocab, block_vocab)]
      update = jnp.dot(dx.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
      dh_ref[:, hk] = jnp.where(j > 0, dh_ref[:, hk], 0.0) + update
      return 0
    return jax.lax.fori_loop(0, w_ref.shape[0] // block_hidden, over_hidden, 0)

  jax.lax.fori_loop(0, w_ref.shape[1] // block_vocab, over_vocab, 0)


def _dweight_kernel(h_ref, w_ref, t_ref, lse_ref, ent_ref, glp_ref, gent_ref, glse_ref, dw_ref, *, block_rows, block_vocab,
                    block_hidden, vocab_size):
  # The block's columns of dW (float32), accumulated in the output block over row blocks.
  j = pl.program_id(0)

  def over_rows(i, _):
    rows = pl.ds(i * block_rows, block_rows)
    x, cols = _logits(h_ref, w_ref, rows, j * block_vocab, block_vocab, block_hidden, vocab_size)
    dx = _dx(x, cols, *(r[rows] for r in (t_ref, lse_ref, ent_ref, glp_ref, gent_ref, glse_ref)), vocab_size)

    def over_hidden(k, _):
      hk = pl.ds(k * block_hidden, block_hidden)
      h = h_ref[rows, hk]
      update = jnp.dot(h.T, dx.astype(h.dtype), preferred_element_type=jnp.float32)
      dw_ref[hk, :] = jnp.where(i > 0, dw_ref[hk, :], 0.0) + update
      return 0
    return jax.lax.fori_loop(0, w_ref.shape[0] // block_hidden, over_hidden, 0)

  jax.lax.fori_loop(0, h_ref.shape[0] // block_rows, over_rows, 0)


def _prepare(hidden, lm_head, targets, blocks):
  block_rows, block_vocab, block_hidden, *warps = blocks
  h = pad_to_multiple(pad_to_multiple(hidden, 1, block_hidden), 0, block_rows)
  w = pad_to_multiple(pad_to_multiple(lm_head, 0, block_hidden), 1, block_vocab)
  t = pad_to_multiple(targets.astype(jnp.int32), 0, block_rows)
  return h, w, t


def _row_spec(block_rows, *cols):
  return pl.BlockSpec((block_rows, *cols), lambda i: (i,) + (0,) * len(cols))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden, lm_head, targets, blocks):
  return _fused_fwd(hidden, lm_head, targets, blocks)[0]


def _fused_fwd(hidden, lm_head, targets, blocks):
  block_rows, block_vocab, block_hidden, *warps = blocks
  n, vocab = hidden.shape[0], lm_head.shape[1]
  h, w, t = _prepare(hidden, lm_head, targets, blocks)
  rows = h.shape[0]
  out = jax.ShapeDtypeStruct((rows,), jnp.float32)
  lp, ent, lse = pl.pallas_call(
      functools.partial(_forward_kernel, block_vocab=block_vocab, block_hidden=block_hidden, vocab_size=vocab),
      grid=(rows // block_rows,),
      in_specs=[_row_spec(block_rows, h.shape[1]), pl.BlockSpec(w.shape, lambda i: (0, 0)), _row_spec(block_rows)],
      out_specs=[_row_spec(block_rows)] * 3, out_shape=[out, out, out],
      interpret=interpret(), compiler_params=compiler_params(*warps),
  )(h, w, t)
  return (lp[:n], ent[:n], lse[:n]), (hidden, lm_head, targets, lse[:n], ent[:n])


def _fused_bwd(blocks, residuals, grads):
  block_rows, block_vocab, block_hidden, *warps = blocks
  hidden, lm_head, targets, lse, entropy = residuals
  g_lp, g_ent, g_lse = grads
  n, vocab = hidden.shape[0], lm_head.shape[1]
  h, w, t = _prepare(hidden, lm_head, targets, blocks)
  rows = h.shape[0]
  per_row = [pad_to_multiple(x.astype(jnp.float32), 0, block_rows) for x in (lse, entropy, g_lp, g_ent, g_lse)]
  sizes = dict(block_vocab=block_vocab, block_hidden=block_hidden, vocab_size=vocab)
  dh = pl.pallas_call(
      functools.partial(_dhidden_kernel, **sizes),
      grid=(rows // block_rows,),
      in_specs=[_row_spec(block_rows, h.shape[1]), pl.BlockSpec(w.shape, lambda i: (0, 0))]
      + [_row_spec(block_rows)] * 6,
      out_specs=_row_spec(block_rows, h.shape[1]), out_shape=jax.ShapeDtypeStruct(h.shape, jnp.float32),
      interpret=interpret(), compiler_params=compiler_params(*warps),
  )(h, w, t, *per_row)
  whole_rows = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  dw = pl.pallas_call(
      functools.partial(_dweight_kernel, block_rows=block_rows, **sizes),
      grid=(w.shape[1] // block_vocab,),
      in_specs=[whole_rows(*h.shape), pl.BlockSpec(w.shape, lambda j: (0, 0))] + [whole_rows(rows)] * 6,
      out_specs=pl.BlockSpec((w.shape[0], block_vocab), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct(w.shape, jnp.float32), interpret=interpret(),
      compiler_params=compiler_params(*warps),
  )(h, w, t, *per_row)
  return (dh[:n, :hidden.shape[1]].astype(hidden.dtype), dw[:lm_head.shape[0], :vocab].astype(lm_head.dtype),
          None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs_pallas(hidden, lm_head, targets, *, return_entropy=False, block_rows=None, block_vocab=None,
                          block_hidden=None, num_warps=8, num_stages=3):
  """``[B,T]`` log-probs (and entropies) of ``targets`` under ``softmax(hidden @ lm_head)``.

  Block sizes are powers of two of at least 16 (Triton's smallest matmul). The defaults (64 rows, 256
  vocabulary columns, 64 hidden, 8 warps, 3 stages) were the fastest of a sweep on an H100
  (bench/gpu_tune.py); interpret mode uses 16 rows and 128 columns, which keeps tests fast.
  """
  b, t, h = hidden.shape
  if block_rows is None:
    block_rows = 16 if interpret() else 64
  if block_vocab is None:
    block_vocab = 128 if interpret() else 256
  if block_hidden is None:
    block_hidden = min(64, max(16, pl.next_power_of_2(h)))
  blocks = (int(block_rows), int(block_vocab), int(block_hidden), int(num_warps), int(num_stages))
  lp, ent, lse = (x.reshape(b, t) for x in _fused(hidden.reshape(b * t, h), lm_head, targets.reshape(b * t), blocks))
  if return_entropy == "with_logz":  # the log-normaliser too, for combining vocabulary shards
    return lp, ent, lse
  return (lp, ent) if return_entropy else lp
