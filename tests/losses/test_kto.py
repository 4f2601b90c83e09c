"""KTO against float64 numpy written from NeMo-Aligner §2.6 (and TRL's KTO, which has the same form)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import kto

SEEDS = [0, 5, 42, 99]


pytestmark = pytest.mark.usefixtures("x64")


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_kto(pi, ref, pi_kl, ref_kl, desirable, beta, wd, wu):
  z = max(0.0, float(np.mean(pi_kl - ref_kl)))
  losses = []
  for i in range(len(pi)):
    rho = pi[i] - ref[i]
    if desirable[i]:
      losses.append(wd * (1.0 - sigmoid(beta * (rho - z))))
    else:
      losses.append(wu * (1.0 - sigmoid(beta * (z - rho))))
  return float(np.mean(losses)), z


def draw(seed, kl_shift=0.5):
  rng = np.random.default_rng(seed)
  b = int(rng.integers(3, 16))
  pi = rng.uniform(-60, -5, b)
  ref = pi + rng.normal(0, 3, b)
  pi_kl = rng.uniform(-90, -20, b)
  ref_kl = pi_kl - rng.normal(kl_shift, 2, b)
  desirable = rng.random(b) < 0.5
  desirable[0], desirable[-1] = True, False
  return pi, ref, pi_kl, ref_kl, desirable


class TestLoss:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("beta,wd,wu", [(0.2, 1.0, 1.0), (0.1, 1.33, 1.0), (0.5, 1.0, 0.7)])
  @pytest.mark.parametrize("kl_shift", [3.0, -3.0])
  def test_matches_numpy(self, seed, beta, wd, wu, kl_shift):
    pi, ref, pi_kl, ref_kl, d = draw(seed, kl_shift)
    got, metrics = kto.loss(pi, ref, pi_kl, ref_kl, d, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert got.dtype == jnp.float64
    want, z = np_kto(pi, ref, pi_kl, ref_kl, d, beta, wd, wu)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["kl"]), z, rtol=1e-12, atol=0)
    rewards = beta * (pi - ref)
    np.testing.assert_allclose(float(metrics["rewards_chosen_mean"]), rewards[d].mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["rewards_rejected_mean"]), rewards[~d].mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["rewards_all_mean"]), rewards.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["rewards_all_std"]), rewards.std(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["desirable_fraction"]), d.mean(), rtol=1e-14)

  def test_reference_point_clamped_at_zero(self):
    pi, ref, pi_kl, ref_kl, d = draw(1, kl_shift=-10.0)
    assert np.mean(pi_kl - ref_kl) < 0
    _, metrics = kto.loss(pi, ref, pi_kl, ref_kl, d)
    assert float(metrics["kl"]) == 0.0
    # With z = 0 the loss no longer depends on the KL batch at all.
    a = kto.loss(pi, ref, pi_kl, ref_kl, d)[0]
    b = kto.loss(pi, ref, pi_kl, ref_kl - 5.0, d)[0]
    assert float(a) == float(b)

  def test_mean_then_clamp(self):
    # Per-sample KL of mixed sign: clamping after the mean gives z = mean; clamping each would not.
    pi = np.array([-10.0, -12.0])
    kl = np.array([3.0, -1.0])
    _, metrics = kto.loss(pi, pi, kl, np.zeros(2), np.array([True, False]))
    assert float(metrics["kl"]) == 1.0

  @pytest.mark.parametrize("seed", SEEDS)
  def test_reference_point_has_zero_gradient(self, seed):
    pi, ref, pi_kl, ref_kl, d = draw(seed, kl_shift=4.0)
    assert np.mean(pi_kl - ref_kl) > 0  # z_ref is active, so without stop_gradient these would be nonzero
    f = lambda a, b: kto.loss(pi, ref, a, b, d)[0]  # noqa: E731
    g_kl, g_ref_kl = jax.grad(f, argnums=(0, 1))(pi_kl, ref_kl)
    assert np.all(np.asarray(g_kl) == 0.0) and np.all(np.asarray(g_ref_kl) == 0.0)

  @pytest.mark.parametrize("seed", SEEDS)
  def test_policy_gradient(self, seed):
    pi, ref, pi_kl, ref_kl, d = draw(seed, kl_shift=2.0)
    beta, wd, wu = 0.3, 1.2, 0.8
    b = len(pi)
    g = np.asarray(jax.grad(lambda p: kto.loss(p, ref, pi_kl, ref_kl, d, beta=beta, desirable_weight=wd,
                                              undesirable_weight=wu)[0])(pi))
    z = max(0.0, np.mean(pi_kl - ref_kl))
    rho = pi - ref
    s_d, s_u = sigmoid(beta * (rho - z)), sigmoid(beta * (z - rho))
    want = np.where(d, -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u)) / b
    np.testing.assert_allclose(g, want, rtol=1e-10)

  def test_all_desirable_metrics_are_finite(self):
    pi, ref, pi_kl, ref_kl, _ = draw(3)
    d = np.ones(len(pi), bool)
    loss, metrics = kto.loss(pi, ref, pi_kl, ref_kl, d)
    assert np.isfinite(float(loss))
    assert float(metrics["rewards_rejected_mean"]) == 0.0

  def test_float32(self):
    pi, ref, pi_kl, ref_kl, d = draw(7)
    args = [x.astype(np.float32) for x in (pi, ref, pi_kl, ref_kl)]
    got, _ = kto.loss(*args, d)
    assert got.dtype == jnp.float32
    want, _ = np_kto(*[a.astype(np.float64) for a in args], d, 0.2, 1.0, 1.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)

  def test_jit(self):
    pi, ref, pi_kl, ref_kl, d = draw(13, kl_shift=2.0)
    got = jax.jit(lambda *a: kto.loss(*a, beta=0.25)[0])(pi, ref, pi_kl, ref_kl, d)
    np.testing.assert_allclose(float(got), np_kto(pi, ref, pi_kl, ref_kl, d, 0.25, 1.0, 1.0)[0], rtol=1e-12)

  def test_errors(self):
    z = np.zeros(3)
    with pytest.raises(ValueError, match="beta"):
      kto.loss(z, z, z, z, np.ones(3, bool), beta=-0.1)
    with pytest.raises(ValueError, match="desirable"):
      kto.loss(z, z, z, z, np.ones(2, bool))
    with pytest.raises(ValueError, match="ref"):
      kto.loss(z, z[:2], z, z, np.ones(3, bool))
    with pytest.raises(ValueError, match="policy_kl"):
      kto.loss(z, z, z, z[:2], np.ones(3, bool))


class TestMismatchedPairs:

  @pytest.mark.parametrize("n", [1, 2, 5, 64])
  def test_next_sample_wrapping(self, n):
    perm = kto.mismatched_pairs(n)
    np.testing.assert_array_equal(perm, [(i + 1) % n for i in range(n)])
    assert sorted(perm.tolist()) == list(range(n))
    if n > 1:
      assert np.all(perm != np.arange(n))  # no prompt is paired with its own response

  def test_bad_n(self):
    with pytest.raises(ValueError, match="n >= 1"):
      kto.mismatched_pairs(0)
