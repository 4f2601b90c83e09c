"""Attention: the dispatch function the models call, and its XLA implementation.

Layouts follow the public contract: q ``[B,T,Hq,D]``, k and v ``[B,S,Hkv,D]`` with Hq a multiple of Hkv
(grouped-query attention), output ``[B,T,Hq,D]`` in q's dtype. Scores and softmax are computed in
float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas", "cudnn")
DECODE_IMPLS = ("xla", "pallas")
# Measured per backend (bench/gpu_kernels.py on an H100, bench/RESULTS.md); other backends get "xla".
DEFAULT_IMPL = {"cpu": "xla", "gpu": "cudnn"}
DEFAULT_DECODE_IMPL = {"cpu": "xla", "gpu": "pallas"}
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B,T,H,D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")


def _grouped_attention(q, k, v, mask, sm_scale):
  """Softmax attention with a boolean mask broadcastable to [B, 1, 1, T, S]."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * sm_scale
  scores = jnp.where(mask, scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def _branch_mask(segment_ids, branch_ids):
  """``[B,T,T]``: equal segments, and the key in the shared prefix (branch 0) or the query's branch."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if branch_ids is None:
    return same
  if branch_ids.shape != segment_ids.shape:
    raise ValueError(f"branch_ids {branch_ids.shape} must be shaped like segment_ids {segment_ids.shape}")
  key_branch = branch_ids[:, None, :]
  return same & ((key_branch == 0) | (key_branch == branch_ids[:, :, None]))


def attention_xla(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, sliding_window=None, branch_ids=None):
  """Reference attention in plain XLA ops; differentiable by JAX."""
  _check_shapes(q, k, v)
  t, s = q.shape[1], k.shape[1]
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  mask = jnp.ones((1, 1, 1, t, s), dtype=bool)
  if causal:
    if t != s:
      raise ValueError(f"causal attention needs as many queries as keys; got T={t}, S={s}")
    qi = jnp.arange(t)[:, None]
    ki = jnp.arange(s)[None, :]
    mask = mask & (ki <= qi)
    if sliding_window is not None:
      mask = mask & (qi - ki < sliding_window)
  if segment_ids is not None:
    if segment_ids.shape != q.shape[:2] or t != s:
      raise ValueError(f"segment_ids {segment_ids.shape} must be [B,T] with T == S for q {q.shape}")
    mask = mask & _branch_mask(segment_ids, branch_ids)[:, None, None]
  return _grouped_attention(q, k, v, mask, sm_scale)


def attention_cudnn(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, sliding_window=None, branch_ids=None):
  """``jax.nn.dot_product_attention``: cuDNN's fused kernel on NVIDIA GPUs (bf16/fp16 inputs), its
  XLA path on other backends. Segment ids become a boolean mask (cuDNN then takes it as a bias)."""
  _check_shapes(q, k, v)
  mask = None
  if segment_ids is not None:
    if segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]:
      raise ValueError(f"segment_ids {segment_ids.shape} must be [B,T] with T == S for q {q.shape}")
    mask = _branch_mask(segment_ids, branch_ids)[:, None]
  window = None if sliding_window is None or not causal else (int(sliding_window) - 1, 0)
  on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale, is_causal=causal,
                                      local_window_size=window, implementation="cudnn" if on_gpu else None)


def default_impl(table=None) -> str:
  return (table or DEFAULT_IMPL).get(jax.default_backend(), "xla")


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, impl=None,
                    sliding_window=None, branch_ids=None):
  """Multi-head (grouped-query) attention; see the module docstring for layouts.

  ``segment_ids`` ``[B,T]``: tokens attend only to tokens with the same id (packed sequences).
  ``branch_ids`` ``[B,T]`` (with ``segment_ids``): within a segment, branch 0 is a shared prefix and
  a token of branch b (1 to 3) sees the prefix and its own branch only (a prompt computed once for
  two responses).
  ``sliding_window`` (Mistral): query i also sees only keys i-window+1..i.
  ``impl``: one of ``IMPLS``, or None for the backend's measured default (``DEFAULT_IMPL``).
  "pallas" runs the kernels of ``attention_pallas`` (in interpret mode on CPU); "cudnn" calls
  ``jax.nn.dot_product_attention`` (cuDNN on GPU for bf16/fp16, else its XLA path).
  """
  if impl is None:
    impl = default_impl()
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; available here: {IMPLS}")
  _check_shapes(q, k, v)
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs as many queries as keys; got T={q.shape[1]}, S={k.shape[1]}")
  kwargs = dict(causal=causal, segment_ids=segment_ids, sm_scale=sm_scale, sliding_window=sliding_window)
  if branch_ids is not None and segment_ids is None:
    raise ValueError("branch_ids need segment_ids")
  if impl == "pallas":
    from jalign.kernels.attention_pallas import attention_pallas
    return attention_pallas(q, k, v, branch_ids=branch_ids, **kwargs)
  if impl == "cudnn":
    return attention_cudnn(q, k, v, branch_ids=branch_ids, **kwargs)
  return attention_xla(q, k, v, branch_ids=branch_ids, **kwargs)


def decode_attention_xla(q, k_cache, v_cache, lengths, *, sm_scale=None, sliding_window=None):
  """One query per row (``q [B,Hq,D]``) against the first ``lengths[b]`` slots of the caches."""
  slots = jnp.arange(k_cache.shape[1])[None, :]
  last = jnp.asarray(lengths)[:, None]
  mask = slots < last
  if sliding_window is not None:
    mask = mask & (slots >= last - sliding_window)
  out = _grouped_attention(q[:, None], k_cache, v_cache, mask[:, None, None, None], _scale(q, sm_scale))
  return out[:, 0]


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, sliding_window=None, impl=None):
  """Attention for the token being decoded: q ``[B,Hq,D]``, caches ``[B,S,Hkv,D]``, ``lengths [B]``
  the valid slots per row (ragged; the new token's K/V already written). Returns ``[B,Hq,D]``.

  ``impl``: one of ``DECODE_IMPLS`` or None for the backend's default (``DEFAULT_DECODE_IMPL``).
  """
  if impl is None:
    impl = default_impl(DEFAULT_DECODE_IMPL)
  if impl not in DECODE_IMPLS:
    raise ValueError(f"unknown decode attention impl {impl!r}; available here: {DECODE_IMPLS}")
  if q.ndim != 3:
    raise ValueError(f"decode q must be [B,Hq,D]; got {q.shape}")
  _check_shapes(q[:, None], k_cache, v_cache)
  if jnp.shape(lengths) != (q.shape[0],):
    raise ValueError(f"lengths must be [B] = [{q.shape[0]}]; got {jnp.shape(lengths)}")
  if impl == "pallas":
    from jalign.kernels.decode_pallas import decode_attention_pallas
    return decode_attention_pallas(q, k_cache, v_cache, lengths, sm_scale=sm_scale, sliding_window=sliding_window)
  return decode_attention_xla(q, k_cache, v_cache, lengths, sm_scale=sm_scale, sliding_window=sliding_window)


def _scale(q, sm_scale):
  return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale


def cached_attention(q, k_cache, v_cache, q_positions, *, sm_scale=None, sliding_window=None):
  """Attention of new queries against a KV cache whose slot i holds position i.

  q ``[B,T,Hq,D]`` at positions ``q_positions [B,T]``; caches ``[B,S,Hkv,D]``. A query at position p
  sees slots 0..p, which are all written by the time p is decoded, so stale slots past a row's
  length are never read.
  """
  _check_shapes(q, k_cache, v_cache)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  slots = jnp.arange(k_cache.shape[1])[None, None, :]
  qp = q_positions[:, :, None]
  mask = slots <= qp
  if sliding_window is not None:
    mask = mask & (qp - slots < sliding_window)
  return _grouped_attention(q, k_cache, v_cache, mask[:, None, None], sm_scale)
