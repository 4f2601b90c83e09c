"""Token log-probs with the LM head's vocabulary sharded over ``tensor``: equal to one device's, in
value, entropy and gradients, for every implementation, and no device ever holds full-vocabulary logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jalign.kernels import logprobs, token_logprobs
from jalign.parallel import mesh as meshlib


def _inputs(seed, b=4, t=24, h=16, v=512):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.standard_normal((b, t, h)), jnp.float32),
          jnp.asarray(r.standard_normal((h, v)), jnp.float32), jnp.asarray(r.integers(0, v, (b, t))))


def _objective(impl):
  def f(h, w, t, g):
    lp, ent = token_logprobs(h, w, t, impl=impl, return_entropy=True)
    return jnp.sum(lp * g) + jnp.sum(ent), (lp, ent)
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


@pytest.mark.parametrize("impl", logprobs.IMPLS)
@pytest.mark.parametrize("sizes", [{"tensor": 8}, {"data": 2, "tensor": 4}])
def test_vocab_sharded_equals_one_device(impl, sizes):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  hidden, lm_head, targets = _inputs(seed)
  weights = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(targets.shape), jnp.float32)
  (ref_value, (ref_lp, ref_ent)), ref_grads = jax.jit(_objective(impl))(hidden, lm_head, targets, weights)

  mesh = meshlib.make_mesh(sizes)
  with meshlib.use(mesh):
    assert logprobs._tensor_parallel_size() == sizes["tensor"]
    rows = NamedSharding(mesh, P("data"))
    args = (jax.device_put(hidden, rows), jax.device_put(lm_head, NamedSharding(mesh, P(None, "tensor"))),
            jax.device_put(targets, rows), jax.device_put(weights, rows))
    step = jax.jit(_objective(impl))
    (value, (lp, ent)), grads = step(*args)
    hlo = step.lower(*args).compile().as_text()

  msg = f"seed={seed}"
  np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5, err_msg=msg)
  # The entropy is log Z minus an expectation of logits: float32 cancellation at |log Z| ~ 10.
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=5e-5, err_msg=msg)
  # The value sums those terms over every token: their float32 rounding adds up (7.6e-5 seen at 5.7).
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=3e-4, err_msg=msg)
  # Both differ from a float64 gradient by ~4e-5 here (the entropy term's float32 rounding).
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=msg)
  # No array with the full vocabulary as its last dimension is made inside the program (the per-device
  # LM-head gradient is [16, 512 / tensor]); nor is the LM head all-gathered.
  full_vocab = re.findall(r"f32\[[0-9,]*,512\]", hlo)
  assert not full_vocab, full_vocab[:3]
  assert "all-gather" not in hlo or not re.search(r"all-gather[^\n]*f32\[16,512\]", hlo)


@pytest.mark.parametrize("impl", logprobs.IMPLS)
def test_vocab_sharded_bfloat16_gradients_sum_in_float32(impl):
  """bf16 hidden states: their gradient is summed over the vocabulary shards in float32 (a bf16
  all-reduce here is both lossy and aborts the CPU compiler), and matches one device's."""
  hidden, lm_head, targets = _inputs(7)
  hidden, lm_head = hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, impl=impl)), argnums=(0, 1)))
  ref = grad(hidden, lm_head)
  mesh = meshlib.make_mesh({"data": 4, "tensor": 2})
  with meshlib.use(mesh):
    args = (hidden, jax.device_put(lm_head, NamedSharding(mesh, P(None, "tensor"))))
    grads = grad(*args)
  for a, b in zip(grads, ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
