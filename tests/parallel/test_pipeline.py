"""Pipeline schedules equal the plain sequential loop, in value and in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.parallel.pipeline import circular, gpipe

S, LAYERS, DIM = 4, 8, 16


def layer(w, x, scale):
  return jnp.tanh(x @ w) * scale[:, None, None] + x


def stage_fn(ws, x, scale):
  """A stage runs its layers in order."""
  for i in range(ws.shape[0]):
    x = layer(ws[i], x, scale)
  return x


def sequential(weights, xs, scales):
  out = []
  for m in range(xs.shape[0]):
    x = xs[m]
    for w in weights:
      x = layer(w, x, scales[m])
    out.append(x)
  return jnp.stack(out)


def _inputs(micro):
  r = np.random.RandomState(0)
  weights = jnp.asarray(r.randn(LAYERS, DIM, DIM) * 0.3, jnp.float32)
  xs = jnp.asarray(r.randn(micro, 2, 3, DIM), jnp.float32)  # [M, mb, T, D]
  scales = jnp.asarray(r.rand(micro, 2) + 0.5, jnp.float32)  # aux that follows its micro-batch
  return weights, xs, scales


@pytest.mark.parametrize("micro", [1, S, 2 * S])
def test_gpipe_equals_the_sequential_loop(micro):
  weights, xs, scales = _inputs(micro)
  staged = lambda w: w.reshape(S, LAYERS // S, DIM, DIM)
  out = gpipe(stage_fn, staged(weights), xs, scales)
  np.testing.assert_allclose(out, sequential(weights, xs, scales), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda w, x: jnp.sum(f(w, x) ** 2)
  g_pipe = jax.grad(loss(lambda w, x: gpipe(stage_fn, staged(w), x, scales)), argnums=(0, 1))(weights, xs)
  g_seq = jax.grad(loss(lambda w, x: sequential(w, x, scales)), argnums=(0, 1))(weights, xs)
  for a, b in zip(g_pipe, g_seq):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()


@pytest.mark.parametrize("micro", [1, S - 1, S, 2 * S])
@pytest.mark.parametrize("repeats", [2])
def test_circular_equals_the_sequential_loop(micro, repeats):
  weights, xs, scales = _inputs(micro)
  # Group g = r*S + s holds layers [g*L/(R*S), (g+1)*L/(R*S)) and runs on stage s.
  staged = lambda w: w.reshape(repeats, S, LAYERS // (S * repeats), DIM, DIM)
  out = circular(stage_fn, staged(weights), xs, scales, repeats=repeats)
  np.testing.assert_allclose(out, sequential(weights, xs, scales), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda w, x: jnp.sum(f(w, x) ** 2)
  g_pipe = jax.grad(loss(lambda w, x: circular(stage_fn, staged(w), x, scales, repeats=repeats)),
                    argnums=(0, 1))(weights, xs)
  g_seq = jax.grad(loss(lambda w, x: sequential(w, x, scales)), argnums=(0, 1))(weights, xs)
  for a, b in zip(g_pipe, g_seq):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
