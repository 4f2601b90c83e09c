"""Decode attention as a Pallas kernel: one new query token per sequence against a ragged KV cache.

Layouts: q ``[B,Hq,D]`` (the token being decoded), caches ``[B,S,Hkv,D]``, ``lengths [B]`` (slots
``0..lengths[b]-1`` of row b are valid; the new token's own K/V are already written). The query
heads that share a KV head are one matrix ``[group, D]`` (zero-padded to 16 rows, Triton's smallest
matmul), so grouped-query attention reads each K/V block once for the whole group.

Split-K ("flash decoding"): the grid is (batch, KV head, split); each program walks the key blocks
of its slice of the cache only up to the row's length, keeping an online softmax, and writes its
unnormalised output with its running max and sum. A few XLA ops merge the splits. Short rows
therefore cost little, and a small batch still fills the GPU. On CPU the kernel runs in interpret
mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jalign.kernels.padding import compiler_params, interpret, pad_to_multiple

_NEG = -1e30


def _decode_kernel(q_ref, k_ref, v_ref, len_ref, o_ref, m_ref, l_ref, *, scale, block_k, window):
  split = pl.program_id(2)
  split_len = k_ref.shape[0]
  start = split * split_len
  length = len_ref[...]
  q = q_ref[...]
  num_blocks = jnp.clip(pl.cdiv(length - start, block_k), 0, split_len // block_k)
  first = 0
  if window is not None:
    first = jnp.clip((length - window - start) // block_k, 0, num_blocks)

  def body(j, carry):
    m, l, acc = carry
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    cols = start + j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = cols < length
    if window is not None:
      keep = keep & (cols >= length - window)
    s = jnp.where(keep, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  rows = q.shape[0]
  init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(first, num_blocks, body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "window"))
def _decode(q, k_cache, v_cache, lengths, *, scale, block_k, num_splits, window):
  b, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  group = hq // hkv
  rows = max(16, pl.next_power_of_2(group))
  qg = pad_to_multiple(q.reshape(b, hkv, group, d), 2, rows)
  split_len = pl.cdiv(pl.cdiv(s, num_splits), block_k) * block_k
  kp, vp = pad_to_multiple(k_cache, 1, split_len), pad_to_multiple(v_cache, 1, split_len)
  splits = kp.shape[1] // split_len
  kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k, window=window)
  kv_spec = pl.BlockSpec((None, split_len, None, d), lambda b, h, s: (b, s, h, 0))
  stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, s, h, 0))
  o, m, l = pl.pallas_call(
      kernel, grid=(b, hkv, splits),
      in_specs=[pl.BlockSpec((None, None, rows, d), lambda b, h, s: (b, h, 0, 0)), kv_spec, kv_spec,
                pl.BlockSpec((None,), lambda b, h, s: (b,))],
      out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda b, h, s: (b, s, h, 0, 0)), stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct((b, splits, hkv, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, hkv, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, hkv, rows), jnp.float32)],
      interpret=interpret(), compiler_params=compiler_params(),
  )(qg, kp, vp, lengths.astype(jnp.int32))
  # Merge the splits' partial softmaxes; a split with no valid key has l = 0 and weighs nothing.
  m_all = jnp.max(m, axis=1, keepdims=True)
  weight = jnp.exp(m - m_all)
  total = jnp.sum(l * weight, axis=1)
  out = jnp.sum(o * weight[..., None], axis=1) / jnp.where(total > 0, total, 1.0)[..., None]
  return out[:, :, :group].reshape(b, hq, d).astype(q.dtype)


def decode_attention_pallas(q, k_cache, v_cache, lengths, *, sm_scale=None, sliding_window=None, block_k=None,
                            num_splits=None):
  """Attention of one query per row against ``lengths`` valid cache slots; see the module docstring.

  ``block_k`` (a power of two, at least 16) defaults to 64; ``num_splits`` to 8 on GPU and 2 in
  interpret mode. A cache whose length is not a multiple of ``num_splits * block_k`` is zero-padded
  on each call (allocate caches in multiples of 512 to avoid the copy).
  """
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  if block_k is None:
    block_k = 64
  if num_splits is None:
    num_splits = 2 if interpret() else 8
  num_splits = max(1, min(int(num_splits), pl.cdiv(k_cache.shape[1], block_k)))
  window = None if sliding_window is None else int(sliding_window)
  return _decode(q, k_cache, v_cache, jnp.asarray(lengths), scale=float(sm_scale), block_k=int(block_k),
                 num_splits=num_splits, window=window)
