"""Flash attention as Pallas kernels: forward, and a backward in two kernels, under one custom VJP.

Layouts as in ``jalign.kernels.attention``: q ``[B,T,Hq,D]``, k/v ``[B,S,Hkv,D]``. Query head h reads
key/value head ``h // (Hq/Hkv)`` through the BlockSpec index map, so grouped-query attention never
repeats K/V in memory.

Forward (grid: batch, query head, query block): walk the key blocks with an online softmax
(running max ``m``, sum ``l``, accumulator), stopping after the diagonal when causal; keep
``lse = m + log l`` for the backward. Masks: padded keys, causality, unequal segment ids (and
branches of a segment other than its shared prefix and the query's own).

Backward (FlashAttention-2): with ``P = exp(S - lse)`` and ``delta = rowsum(dO * O)``,
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - delta)``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale``.
One kernel per (batch, KV head, key block) accumulates dK and dV over its query heads and query
blocks; one per (batch, query head, query block) accumulates dQ over key blocks.

Lengths need not be multiples of the blocks: inputs are zero-padded and padded keys masked.
``sliding_window`` (Mistral) also hides keys more than window-1 positions back.
Scores and accumulators are float32 whatever the input dtype. On CPU the kernels run in Pallas
interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jalign.kernels.padding import compiler_params, interpret, pad_to_multiple

_NEG = -1e30


def _mask(q_start, k_start, bq, bk, seq_k, causal, q_seg, k_seg, window=None):
  rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  keep = cols < seq_k
  if causal:
    keep = keep & (cols <= rows)
  if window is not None:
    keep = keep & (rows - cols < window)
  if q_seg is not None:
    keep = keep & _visible(q_seg[:, None], k_seg[None, :])
  return keep


def _visible(q_id, k_id):
  """Ids are ``segment * 4 + branch``: equal segments, and the key in the shared prefix (branch 0)
  or the query's own branch (``attention.flash_attention``'s ``branch_ids``)."""
  k_branch = jnp.bitwise_and(k_id, 3)
  same_segment = jnp.right_shift(q_id, 2) == jnp.right_shift(k_id, 2)
  return same_segment & ((k_branch == 0) | (k_branch == jnp.bitwise_and(q_id, 3)))


def _num_key_blocks(q_block, bq, bk, num_k, causal):
  if not causal:
    return num_k
  return jnp.minimum(num_k, ((q_block + 1) * bq + bk - 1) // bk)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, causal, bq, bk, seq_k, window):
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]
  num_k = k_ref.shape[0] // bk

  def body(j, carry):
    m, l, acc = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    k_seg = None if ks_ref is None else ks_ref[pl.ds(j * bk, bk)]
    # Matmul operands stay in the input dtype (bf16 tensor cores), accumulating in float32.
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    s = jnp.where(_mask(i * bq, j * bk, bq, bk, seq_k, causal, q_seg, k_seg, window), s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, q.shape[1]), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _num_key_blocks(i, bq, bk, num_k, causal), body, init)
  safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe), _NEG)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref, *,
                scale, causal, bq, bk, seq_k, group, window):
  j = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  k_seg = None if ks_ref is None else ks_ref[...]
  num_q = q_ref.shape[0] // bq
  first = (j * bk) // bq if causal else 0

  def over_queries(g, carry):
    def body(i, carry):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q = q_ref[rows, g, :]
      do = do_ref[rows, g, :]
      q_seg = None if qs_ref is None else qs_ref[rows]
      s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
      keep = _mask(i * bq, j * bk, bq, bk, seq_k, causal, q_seg, k_seg, window)
      p = jnp.where(keep, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
      dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_ref[g, rows][:, None])
      return dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32) * scale, dv
    return jax.lax.fori_loop(first, num_q, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, over_queries, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref, *,
               scale, causal, bq, bk, seq_k, window):
  i = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]
  num_k = k_ref.shape[0] // bk

  def body(j, dq):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    k_seg = None if ks_ref is None else ks_ref[pl.ds(j * bk, bk)]
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    keep = _mask(i * bq, j * bk, bq, bk, seq_k, causal, q_seg, k_seg, window)
    p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=jnp.float32) - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

  dq = jax.lax.fori_loop(0, _num_key_blocks(i, bq, bk, num_k, causal), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(bq, s_pad, d, group, has_seg):
  """BlockSpecs for (q, k, v, q_seg, k_seg) on a grid (batch, query head, query block)."""
  q = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
  kv = pl.BlockSpec((None, s_pad, None, d), lambda b, h, i: (b, 0, h // group, 0))
  seg = [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, s_pad), lambda b, h, i: (b, 0))]
  return [q, kv, kv] + (seg if has_seg else [])


def _without_segments(kernel, n_inputs):
  """The kernel, given None for its two segment-id refs (which then take no place in the call)."""
  return lambda *refs: kernel(*refs[:n_inputs], None, None, *refs[n_inputs:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, seg, causal, scale, bq, bk, window, warps):
  return _flash_fwd(q, k, v, seg, causal, scale, bq, bk, window, warps)[0]


def _flash_fwd(q, k, v, seg, causal, scale, bq, bk, window, warps):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  qp, kp, vp = pad_to_multiple(q, 1, bq), pad_to_multiple(k, 1, bk), pad_to_multiple(v, 1, bk)
  t_pad, s_pad = qp.shape[1], kp.shape[1]
  has_seg = seg is not None
  args = [qp, kp, vp]
  if has_seg:
    args += [pad_to_multiple(seg, 1, bq), pad_to_multiple(seg, 1, bk)]
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk, seq_k=s, window=window)
  if not has_seg:
    kernel = _without_segments(kernel, 3)
  o, lse = pl.pallas_call(
      kernel, grid=(b, hq, t_pad // bq), in_specs=_specs(bq, s_pad, d, group, has_seg),
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)],
      interpret=interpret(), compiler_params=compiler_params(*warps))(*args)
  return o[:, :t], (q, k, v, seg, o, lse)


def _flash_bwd(causal, scale, bq, bk, window, warps, res, do):
  q, k, v, seg, o, lse = res
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  qp, kp, vp, dop = pad_to_multiple(q, 1, bq), pad_to_multiple(k, 1, bk), pad_to_multiple(v, 1, bk), pad_to_multiple(do, 1, bq)
  t_pad, s_pad = qp.shape[1], kp.shape[1]
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), dop.astype(jnp.float32))
  has_seg = seg is not None
  segs = [pad_to_multiple(seg, 1, bq), pad_to_multiple(seg, 1, bk)] if has_seg else []

  # dK, dV: grid (batch, KV head, key block); all query rows of the group's heads in view.
  q_all = pl.BlockSpec((None, t_pad, group, d), lambda b, h, j: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0))
  rows_all = pl.BlockSpec((None, group, t_pad), lambda b, h, j: (b, h, 0))
  seg_specs = [pl.BlockSpec((None, t_pad), lambda b, h, j: (b, 0)), pl.BlockSpec((None, bk), lambda b, h, j: (b, j))]
  kernel = functools.partial(_dkv_kernel, scale=scale, causal=causal, bq=bq, bk=bk, seq_k=s, group=group,
                             window=window)
  if not has_seg:
    kernel = _without_segments(kernel, 6)
  dk, dv = pl.pallas_call(
      kernel, grid=(b, hkv, s_pad // bk),
      in_specs=[q_all, kv_blk, kv_blk, q_all, rows_all, rows_all] + (seg_specs if has_seg else []),
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      interpret=interpret(), compiler_params=compiler_params(*warps))(qp, kp, vp, dop, lse, delta, *segs)

  # dQ: grid (batch, query head, query block), walking the key blocks.
  q_blk = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, s_pad, None, d), lambda b, h, i: (b, 0, h // group, 0))
  row_blk = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  seg_specs = [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, s_pad), lambda b, h, i: (b, 0))]
  kernel = functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bk=bk, seq_k=s, window=window)
  if not has_seg:
    kernel = _without_segments(kernel, 6)
  dq = pl.pallas_call(
      kernel, grid=(b, hq, t_pad // bq),
      in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk] + (seg_specs if has_seg else []),
      out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      interpret=interpret(), compiler_params=compiler_params(*warps))(qp, kp, vp, dop, lse, delta, *segs)
  return dq[:, :t], dk[:, :s], dv[:, :s], None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_pallas(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, sliding_window=None,
                     block_q=64, block_k=64, num_warps=4, num_stages=2, branch_ids=None):
  """Flash attention; see the module docstring. Block sizes are powers of two (at least 16 on GPU);
  ``num_warps`` and ``num_stages`` are passed to Triton. ``branch_ids`` (0 to 3, with
  ``segment_ids``) travel in the segment ids' two low bits."""
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids, jnp.int32) * 4
    if branch_ids is not None:
      segment_ids = segment_ids + jnp.asarray(branch_ids, jnp.int32)
  window = None if sliding_window is None else int(sliding_window)
  return _flash(q, k, v, segment_ids, bool(causal), float(sm_scale), int(block_q), int(block_k), window,
                (int(num_warps), int(num_stages)))
