"""The gap between the engine's and the trainer's log-probs, and truncated importance sampling, against
plain float64 loops; the PPO actor loss with the weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import offpolicy, ppo


def draw(seed, shape=(4, 9)):
  rng = np.random.default_rng(seed)
  engine = rng.normal(-2.0, 1.0, shape).astype(np.float32)
  mask = (rng.random(shape) < 0.6).astype(np.float32)
  return rng, engine, mask


def loop_gap(engine, trainer, mask):
  diffs = [float(trainer[i, t]) - float(engine[i, t]) for i, t in zip(*np.nonzero(mask))]
  return {"logprob_gap_mean": sum(abs(d) for d in diffs) / len(diffs), "logprob_gap_max": max(abs(d) for d in diffs),
          "logprob_gap_kl": sum(math.exp(d) - 1 - d for d in diffs) / len(diffs)}


def test_the_gap_is_zero_exactly_where_engine_and_trainer_agree():
  _, engine, mask = draw(0)
  assert offpolicy.logprob_gap(engine, engine.copy(), mask) == {
      "logprob_gap_mean": 0.0, "logprob_gap_max": 0.0, "logprob_gap_kl": 0.0}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_gap_is_the_mean_max_and_k3_kl_over_the_response_tokens(seed):
  rng, engine, mask = draw(seed)
  trainer = engine + rng.normal(0, 0.05, engine.shape).astype(np.float32)
  trainer[mask == 0] += 10.0  # what the mask leaves out does not count
  got = offpolicy.logprob_gap(engine, trainer, mask)
  for key, want in loop_gap(engine, trainer, mask).items():
    assert got[key] == pytest.approx(want, rel=1e-9), key
  assert 0 < got["logprob_gap_kl"] < got["logprob_gap_mean"]  # second order in the differences


def test_no_response_tokens_give_no_gap():
  _, engine, mask = draw(4)
  assert set(offpolicy.logprob_gap(engine, engine + 1, 0 * mask).values()) == {0.0}


@pytest.mark.parametrize("cap", [2.0, 1.2])
def test_tis_weights_are_the_ratio_capped_under_the_mask(cap):
  rng, engine, mask = draw(5)
  trainer = engine + rng.normal(0, 0.5, engine.shape).astype(np.float32)  # ratios on both sides of the cap
  got = offpolicy.tis_weights(engine, trainer, mask, cap)
  assert got.dtype == np.float32 and got.shape == engine.shape
  for i in range(engine.shape[0]):
    for t in range(engine.shape[1]):
      want = min(math.exp(float(trainer[i, t]) - float(engine[i, t])), cap) if mask[i, t] else 0.0
      assert got[i, t] == pytest.approx(want, rel=1e-6)
  assert (got == np.float32(cap)).any() and ((got > 0) & (got < 1)).any()
  with pytest.raises(ValueError, match="cap must be positive"):
    offpolicy.tis_weights(engine, trainer, mask, 0.0)


def test_the_actor_loss_weighs_each_tokens_surrogate_without_a_gradient_through_the_weights():
  rng, old, mask = draw(6)
  new = old + rng.normal(0, 0.4, old.shape)
  adv = rng.normal(size=old.shape)
  weights = rng.uniform(0.2, 2.0, old.shape)
  loss, metrics = ppo.actor_loss(new, old, adv, mask, weights=weights)
  num = den = 0.0
  for i, j in zip(*np.nonzero(mask)):
    r = np.exp(new[i, j] - old[i, j])
    num += weights[i, j] * max(-adv[i, j] * r, -adv[i, j] * min(max(r, 0.8), 1.2))
    den += 1
  np.testing.assert_allclose(loss, num / den, rtol=1e-6)
  np.testing.assert_allclose(metrics["tis_weight"], weights[mask > 0].mean(), rtol=1e-6)
  plain, _ = ppo.actor_loss(new, old, adv, mask)
  np.testing.assert_allclose(ppo.actor_loss(new, old, adv, mask, weights=np.ones_like(old))[0], plain, rtol=1e-12)
  through = jax.grad(lambda w: ppo.actor_loss(new, old, adv, mask, weights=w)[0])(jnp.asarray(weights))
  assert not np.asarray(through).any()
