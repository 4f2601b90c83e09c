"""Kernels against plain-numpy references; one parameterised class per kernel over every implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.kernels import attention, logprobs
from jalign.kernels import flash_attention, token_logprobs


def numpy_attention(q, k, v, causal, segment_ids, window=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  mask = np.ones((b, 1, t, k.shape[1]), bool)
  if causal:
    i, j = np.arange(t)[:, None], np.arange(k.shape[1])[None]
    mask &= j <= i
    if window:
      mask &= i - j < window
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    mask &= (seg[:, :, None] == seg[:, None, :])[:, None]
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("impl", attention.IMPLS)
class TestFlashAttention:

  def _inputs(self, b=2, t=12, hq=4, hkv=2, d=8, seed=0):
    r = np.random.RandomState(seed)
    return (jnp.asarray(r.randn(b, t, hq, d), jnp.float32), jnp.asarray(r.randn(b, t, hkv, d), jnp.float32),
            jnp.asarray(r.randn(b, t, hkv, d), jnp.float32))

  @pytest.mark.parametrize("causal", [True, False])
  def test_matches_numpy(self, impl, causal):
    q, k, v = self._inputs()
    out = flash_attention(q, k, v, causal=causal, impl=impl)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, causal, None), atol=1e-5)

  def test_segment_ids_and_sliding_window(self, impl):
    q, k, v = self._inputs()
    seg = jnp.array([[1] * 5 + [2] * 7, [3] * 12])
    out = flash_attention(q, k, v, segment_ids=seg, impl=impl)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, True, seg), atol=1e-5)
    out = flash_attention(q, k, v, sliding_window=3, impl=impl)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, True, None, window=3), atol=1e-5)

  def test_gradients_match_the_xla_reference(self, impl):
    q, k, v = self._inputs()
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    ours = f(lambda q, k, v: flash_attention(q, k, v, impl=impl))
    ref = f(lambda q, k, v: attention.attention_xla(q, k, v))
    for a, b in zip(ours, ref):
      np.testing.assert_allclose(a, b, atol=1e-5)

  def test_bad_shapes_are_refused(self, impl):
    q, k, v = self._inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="not a multiple"):
      flash_attention(q, k, v, impl=impl)


def numpy_logprobs(hidden, lm_head, targets):
  logits = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  entropy = -(np.exp(logp) * logp).sum(-1)
  return picked, entropy


@pytest.mark.parametrize("impl", logprobs.IMPLS)
class TestTokenLogprobs:

  @pytest.mark.parametrize("t", [7, logprobs.DEFAULT_CHUNK * 2 + 3])  # one block, and several
  def test_matches_numpy(self, impl, t):
    r = np.random.RandomState(0)
    hidden, lm_head = jnp.asarray(r.randn(2, t, 16), jnp.float32), jnp.asarray(r.randn(16, 50), jnp.float32)
    targets = jnp.asarray(r.randint(0, 50, (2, t)))
    lp, ent = token_logprobs(hidden, lm_head, targets, impl=impl, return_entropy=True)
    ref_lp, ref_ent = numpy_logprobs(hidden, lm_head, targets)
    np.testing.assert_allclose(lp, ref_lp, atol=1e-4)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-4)
    assert lp.dtype == jnp.float32 and lp.shape == (2, t)

  @pytest.mark.parametrize("vocab", [30, 300])  # one vocabulary block, and several with a ragged last one
  def test_gradients_match_autodiff_of_the_full_softmax(self, impl, vocab, monkeypatch):
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 64)
    r = np.random.RandomState(1)
    hidden, lm_head = jnp.asarray(r.randn(2, 300, 8), jnp.float32), jnp.asarray(r.randn(8, vocab), jnp.float32)
    targets = jnp.asarray(r.randint(0, vocab, (2, 300)))

    def ref(h, w):
      logp = jax.nn.log_softmax(h @ w)
      lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
      return jnp.sum(lp) + jnp.sum(-jnp.exp(logp) * logp)

    def ours(h, w):
      lp, ent = token_logprobs(h, w, targets, impl=impl, return_entropy=True)
      return jnp.sum(lp) + jnp.sum(ent)

    for a, b in zip(jax.grad(ours, (0, 1))(hidden, lm_head), jax.grad(ref, (0, 1))(hidden, lm_head)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
