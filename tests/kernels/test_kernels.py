"""Kernels against plain-numpy references; one parameterised class per kernel over every implementation.

Inputs are drawn fresh on every run (the seed is in each failure message). Pallas outputs are poisoned:
the interpreter fills every output buffer with NaN (integers with their minimum) before the kernel runs,
so an element a kernel forgets to write fails the comparison (``test_interpreter_poisons_outputs``
guards that assumption). Tolerances are keyed by the input dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jalign.kernels import attention, logprobs
from jalign.kernels import decode_attention, flash_attention, token_logprobs

# Absolute tolerance relative to the reference's largest magnitude, by input dtype.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.fixture
def rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return np.random.default_rng(seed), f"seed={seed}"


def assert_close(actual, expected, dtype, msg):
  expected = np.asarray(expected, np.float64)
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=msg)


def numpy_attention(q, k, v, causal, segment_ids, window=None):
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
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


def test_interpreter_poisons_outputs():
  def half(x_ref, o_ref):
    o_ref[:8] = x_ref[:8]
  out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), interpret=True)(jnp.ones(16))
  assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(np.asarray(out[8:])))


@pytest.mark.parametrize("impl", attention.IMPLS)
class TestFlashAttention:

  def _inputs(self, rng, b=2, t=12, hq=4, hkv=2, d=8, dtype=jnp.float32):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return draw(b, t, hq, d), draw(b, t, hkv, d), draw(b, t, hkv, d)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("causal", [True, False])
  def test_matches_numpy(self, impl, causal, dtype, rng):
    rng, seed = rng
    q, k, v = self._inputs(rng, t=int(rng.integers(5, 40)), dtype=dtype)
    out = flash_attention(q, k, v, causal=causal, impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, numpy_attention(q, k, v, causal, None), dtype, seed)

  def test_segment_ids_and_sliding_window(self, impl, rng):
    rng, seed = rng
    q, k, v = self._inputs(rng)
    cut = int(rng.integers(1, 11))
    seg = jnp.array([[1] * cut + [2] * (12 - cut), [3] * 12])
    out = flash_attention(q, k, v, segment_ids=seg, impl=impl)
    assert_close(out, numpy_attention(q, k, v, True, seg), jnp.float32, seed)
    out = flash_attention(q, k, v, sliding_window=3, impl=impl)
    assert_close(out, numpy_attention(q, k, v, True, None, window=3), jnp.float32, seed)

  def test_gradients_match_the_xla_reference(self, impl, rng):
    rng, seed = rng
    q, k, v = self._inputs(rng)
    seg = jnp.array([[1] * 7 + [2] * 5, [3] * 12])
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    ours = f(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, impl=impl))
    ref = f(lambda q, k, v: attention.attention_xla(q, k, v, segment_ids=seg))
    for a, b in zip(ours, ref):
      assert_close(a, b, jnp.float32, seed)

  def test_bad_shapes_are_refused(self, impl, rng):
    q, k, v = self._inputs(rng[0], hq=3, hkv=2)
    with pytest.raises(ValueError, match="not a multiple"):
      flash_attention(q, k, v, impl=impl)


def numpy_decode(q, k, v, lengths, window=None):
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  group = q.shape[1] // k.shape[2]
  out = np.zeros(q.shape)
  for b, n in enumerate(np.asarray(lengths)):
    lo = 0 if window is None else max(0, n - window)
    kb, vb = np.repeat(k[b, lo:n], group, axis=1), np.repeat(v[b, lo:n], group, axis=1)
    s = np.einsum("hd,shd->hs", q[b], kb) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    out[b] = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), vb)
  return out


@pytest.mark.parametrize("impl", attention.DECODE_IMPLS)
class TestDecodeAttention:

  def _inputs(self, rng, b=4, s=200, hq=8, hkv=2, d=16, dtype=jnp.float32):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    lengths = jnp.asarray(np.concatenate([[1, s], rng.integers(1, s + 1, b - 2)]), jnp.int32)
    return draw(b, hq, d), draw(b, s, hkv, d), draw(b, s, hkv, d), lengths

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_ragged_lengths_match_numpy(self, impl, dtype, rng):
    rng, seed = rng
    q, k, v, lengths = self._inputs(rng, dtype=dtype)
    out = decode_attention(q, k, v, lengths, impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, numpy_decode(q, k, v, lengths), dtype, f"{seed} lengths={lengths}")

  def test_sliding_window_and_garbage_past_the_length(self, impl, rng):
    rng, seed = rng
    q, k, v, lengths = self._inputs(rng)
    out = decode_attention(q, k, v, lengths, sliding_window=37, impl=impl)
    assert_close(out, numpy_decode(q, k, v, lengths, window=37), jnp.float32, seed)
    past = np.arange(k.shape[1])[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
    k_bad, v_bad = jnp.where(past, 1e4, k), jnp.where(past, -3e4, v)  # stale slots of a reused cache
    np.testing.assert_array_equal(decode_attention(q, k_bad, v_bad, lengths, impl=impl),
                                  decode_attention(q, k, v, lengths, impl=impl), err_msg=seed)

  def test_equals_cached_attention_of_the_model(self, impl, rng):
    rng, seed = rng
    q, k, v, lengths = self._inputs(rng)
    ref = attention.cached_attention(q[:, None], k, v, (lengths - 1)[:, None])[:, 0]
    assert_close(decode_attention(q, k, v, lengths, impl=impl), ref, jnp.float32, seed)


def numpy_logprobs(hidden, lm_head, targets):
  logits = np.asarray(jnp.asarray(hidden, jnp.float32), np.float64) @ np.asarray(
      jnp.asarray(lm_head, jnp.float32), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  entropy = -(np.exp(logp) * logp).sum(-1)
  return picked, entropy


def numpy_logprob_grads(hidden, lm_head, targets, g_lp, g_ent):
  """Float64 gradients of sum(g_lp * log p[target] + g_ent * entropy) in the hidden states and LM head.

  With p = softmax(z): d log p[t] / dz = onehot(t) - p, and d entropy / dz = -p * (log p + entropy).
  """
  h, w = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (hidden, lm_head))
  logits = h @ w
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  p = np.exp(logp)
  entropy = -(p * logp).sum(-1, keepdims=True)
  onehot = np.eye(w.shape[1])[np.asarray(targets)]
  g_lp, g_ent = (np.asarray(g, np.float64)[..., None] for g in (g_lp, g_ent))
  g_logits = g_lp * (onehot - p) - g_ent * p * (logp + entropy)
  return g_logits @ w.T, np.einsum("btd,btv->dv", h, g_logits)


# "xla" computes these small problems whole (plain autodiff); "xla_chunked" forces its chunked path
# with the recomputing backward, the one large vocabularies take.
LOGPROB_VARIANTS = [*logprobs.IMPLS, "xla_chunked"]


@pytest.mark.parametrize("variant", LOGPROB_VARIANTS)
class TestTokenLogprobs:

  @pytest.fixture
  def impl(self, variant, monkeypatch):
    if variant == "xla_chunked":
      monkeypatch.setattr(logprobs, "PLAIN_MAX_LOGITS_BYTES", 0)
      return "xla"
    return variant

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("t", [7, logprobs.DEFAULT_CHUNK * 2 + 3])  # one block, and several
  def test_matches_numpy(self, impl, t, dtype, rng):
    rng, seed = rng
    hidden = jnp.asarray(rng.standard_normal((2, t, 40)) / 4, dtype)
    lm_head = jnp.asarray(rng.standard_normal((40, 300)), dtype)
    targets = jnp.asarray(rng.integers(0, 300, (2, t)))
    lp, ent = token_logprobs(hidden, lm_head, targets, impl=impl, return_entropy=True)
    ref_lp, ref_ent = numpy_logprobs(hidden, lm_head, targets)
    assert lp.dtype == jnp.float32 and lp.shape == (2, t)
    # bf16 inputs are exact in the reference; only the kernels' rounding is measured.
    assert_close(lp, ref_lp, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, seed)
    assert_close(ent, ref_ent, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, seed)

  @pytest.mark.parametrize("vocab", [30, 300])  # one vocabulary block, and several with a ragged last one
  def test_gradients_match_float64_numpy(self, impl, vocab, monkeypatch, rng):
    rng, seed = rng
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 64)
    hidden = jnp.asarray(rng.standard_normal((2, 300, 24)), jnp.float32)
    lm_head = jnp.asarray(rng.standard_normal((24, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (2, 300)))
    g_lp, g_ent = (jnp.asarray(rng.standard_normal((2, 300)), jnp.float32) for _ in range(2))

    def ours(h, w):
      lp, ent = token_logprobs(h, w, targets, impl=impl, return_entropy=True)
      return jnp.sum(lp * g_lp) + jnp.sum(ent * g_ent)

    expected = numpy_logprob_grads(hidden, lm_head, targets, g_lp, g_ent)
    for actual, reference in zip(jax.grad(ours, (0, 1))(hidden, lm_head), expected):
      assert_close(actual, reference, jnp.float32, seed)

  def test_bfloat16_gradients_match_float64_numpy(self, impl, monkeypatch, rng):
    rng, seed = rng
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 64)
    hidden = jnp.asarray(rng.standard_normal((2, 150, 32)) / 4, jnp.bfloat16)
    lm_head = jnp.asarray(rng.standard_normal((32, 300)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 300, (2, 150)))
    g_lp, g_ent = (jnp.asarray(rng.standard_normal((2, 150)), jnp.float32) for _ in range(2))

    def ours(h, w):
      lp, ent = token_logprobs(h, w, targets, impl=impl, return_entropy=True)
      return jnp.sum(lp * g_lp) + jnp.sum(ent * g_ent)

    grads = jax.grad(ours, (0, 1))(hidden, lm_head)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    # bf16 values are exact in the float64 reference, so this measures only the kernels' rounding.
    for actual, reference in zip(grads, numpy_logprob_grads(hidden, lm_head, targets, g_lp, g_ent)):
      assert_close(actual, reference, jnp.bfloat16, seed)

  def test_log_probs_alone_skip_the_entropy_and_keep_their_gradient(self, impl, rng):
    rng, seed = rng
    hidden = jnp.asarray(rng.standard_normal((2, 50, 24)), jnp.float32)
    lm_head = jnp.asarray(rng.standard_normal((24, 300)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 50)))
    g = jnp.asarray(rng.standard_normal((2, 50)), jnp.float32)
    ours = lambda h, w: jnp.sum(token_logprobs(h, w, targets, impl=impl) * g)
    ref = lambda h, w: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w), targets[..., None], -1)[..., 0] * g)
    for a, b in zip(jax.grad(ours, (0, 1))(hidden, lm_head), jax.grad(ref, (0, 1))(hidden, lm_head)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=seed)


@pytest.mark.parametrize("impl", attention.IMPLS)
def test_branch_ids_see_the_shared_prefix_and_their_own_branch(impl):
  """A row [prefix, branch 1, branch 2]: each branch's outputs equal those of [prefix, branch] alone."""
  r = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
  prefix, b1, b2, hq, hkv, d = 5, 4, 6, 4, 2, 8
  t = prefix + b1 + b2
  q, k, v = (jnp.asarray(r.standard_normal((1, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
  segment = jnp.ones((1, t), jnp.int32)
  branch = jnp.asarray([[0] * prefix + [1] * b1 + [2] * b2])
  out = flash_attention(q, k, v, segment_ids=segment, branch_ids=branch, impl=impl)
  for lo, hi in ((prefix, prefix + b1), (prefix + b1, t)):
    idx = np.r_[0:prefix, lo:hi]
    alone = flash_attention(q[:, idx], k[:, idx], v[:, idx], impl="xla")
    np.testing.assert_allclose(out[:, lo:hi], alone[:, prefix:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, :prefix], flash_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], impl="xla"),
                             rtol=1e-5, atol=1e-5)
  # Gradients too (the Pallas backward kernels apply the same mask).
  loss = lambda q, k, v: jnp.sum(jnp.sin(flash_attention(q, k, v, segment_ids=segment, branch_ids=branch, impl=impl)))
  ref = lambda q, k, v: jnp.sum(jnp.sin(flash_attention(q, k, v, segment_ids=segment, branch_ids=branch, impl="xla")))
  for a, b in zip(jax.grad(loss, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
