"""The GRPO family against float64 numpy loops written from the papers (DeepSeekMath's GRPO, Dr. GRPO,
DAPO, GSPO) and the dual-clip PPO of Ye et al."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import grpo

pytestmark = pytest.mark.usefixtures("x64")
SEEDS = [0, 5, 21]
RTOL = 1e-6


def draw(rng, b=6, width=10, *, empty_row=True):
  """Rows of log-probs around -2 with masks of different lengths; row 1 masked out entirely."""
  mask = np.zeros((b, width))
  for i in range(b):
    start = rng.integers(0, 3)
    mask[i, start:start + rng.integers(1, width - start + 1)] = 1.0
  if empty_row:
    mask[1] = 0.0
  old = rng.normal(-2, 0.5, (b, width))
  new = old + rng.normal(0, 0.3, (b, width))
  return new, old, mask


def np_advantages(rewards, groups, scale, eps):
  out = np.zeros(len(rewards))
  for i, g in enumerate(groups):
    members = rewards[groups == g]
    if len(members) < 2:
      continue
    centred = rewards[i] - members.mean()
    out[i] = centred / (members.std(ddof=1) + eps) if scale else centred
  return out


def np_token_losses(new, old, adv, mask, eps_low, eps_high, dual, sequence):
  b, t = new.shape
  loss = np.zeros((b, t))
  ratios = np.zeros((b, t))
  for i in range(b):
    n = mask[i].sum()
    seq = np.exp(((new[i] - old[i]) * mask[i]).sum() / n) if n else 1.0
    for j in range(t):
      r = seq if sequence else np.exp(new[i, j] - old[i, j])
      a = adv[i]
      value = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
      if dual is not None and a < 0:
        value = min(value, -dual * a)
      loss[i, j], ratios[i, j] = value, r
  return loss, ratios


def np_aggregate(values, mask, mode, constant=None):
  if mode == "token_mean":
    return (values * mask).sum() / mask.sum()
  if mode == "sequence_mean":
    rows = [(values[i] * mask[i]).sum() / mask[i].sum() for i in range(len(mask)) if mask[i].sum() > 0]
    return np.mean(rows)
  return np.mean([(values[i] * mask[i]).sum() / constant for i in range(len(mask))])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages(seed, scale):
  rng = np.random.default_rng(seed)
  groups = np.array([3, 3, 3, 3, 7, 7, 7, 7, 9, 2, 2, 2])
  rewards = rng.normal(0, 2, len(groups))
  rewards[9:] = 1.5  # a zero-variance group
  got = grpo.group_advantages(rewards, groups, scale_rewards=scale, eps=1e-6)
  np.testing.assert_allclose(got, np_advantages(rewards, groups, scale, 1e-6), rtol=RTOL, atol=1e-12)
  assert got[8] == 0.0 and np.all(np.asarray(got[9:]) == 0.0)  # a lone sample; an all-equal group


def test_zero_variance_groups():
  groups = np.array([0, 0, 1, 1, 2, 2, 3])
  rewards = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 5.0])
  np.testing.assert_array_equal(grpo.zero_variance_groups(rewards, groups),
                                [True, True, False, False, True, True, True])


def test_overlong_penalty():
  lengths = np.array([0, 80, 96, 97, 100, 112, 128, 129, 500])
  max_length, window = 128, 32
  want = [0.0 if n <= 96 else ((96 - n) / 32 if n <= 128 else -1.0) for n in lengths]
  np.testing.assert_allclose(grpo.overlong_penalty(lengths, max_length=max_length, window=window), want, rtol=RTOL)
  np.testing.assert_array_equal(grpo.overlong_penalty(lengths, max_length=128, window=0), [0] * 7 + [-1, -1])


@pytest.mark.parametrize("estimator", grpo.KL_ESTIMATORS)
def test_kl_estimators(estimator):
  rng = np.random.default_rng(1)
  lp, ref = rng.normal(-2, 1, (3, 5)), rng.normal(-2, 1, (3, 5))
  d = ref - lp
  want = {"k1": -d, "k2": d ** 2 / 2, "k3": np.exp(d) - 1 - d}[estimator]
  np.testing.assert_allclose(grpo.kl_estimate(lp, ref, estimator), want, rtol=RTOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_token_losses(seed, sequence, dual):
  rng = np.random.default_rng(seed)
  new, old, mask = draw(rng)
  new[0] = old[0] + np.log(3.5)  # far above both clips, so the dual clip binds where A < 0
  adv = rng.normal(0, 1, len(mask))
  adv[0] = -1.0
  got, parts = grpo.token_losses(new, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual,
                                 ratio="sequence" if sequence else "token")
  want, ratios = np_token_losses(new, old, adv, mask, 0.2, 0.28, dual, sequence)
  on = mask > 0
  np.testing.assert_allclose(np.asarray(got)[on], want[on], rtol=RTOL)
  np.testing.assert_allclose(np.asarray(parts["ratio"])[on], ratios[on], rtol=RTOL)
  if dual is not None:
    assert np.asarray(parts["dual_clipped"])[0][on[0]].all()


def test_asymmetric_clip_boundaries():
  """Ratios just inside, on and just outside 1 - eps_low and 1 + eps_high, for both signs of A: the
  value is the unclipped one inside and the clipped one outside, and outside the gradient is 0 only
  where clipping binds (A > 0 above the upper clip, A < 0 below the lower)."""
  eps_low, eps_high, tiny = 0.2, 0.28, 1e-4
  ratios = np.array([1 - eps_low - tiny, 1 - eps_low + tiny, 1.0, 1 + eps_high - tiny, 1 + eps_high + tiny])
  old = np.full((2, len(ratios)), -1.5)
  new = old + np.log(ratios)
  adv = np.array([1.0, -1.0])
  mask = np.ones_like(old)
  got, parts = grpo.token_losses(new, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
  want, _ = np_token_losses(new, old, adv, mask, eps_low, eps_high, None, False)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_array_equal(parts["clipped_high"], [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(parts["clipped_low"], [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
  grad = jax.grad(lambda lp: jnp.sum(grpo.token_losses(lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high)[0]))(
      jnp.asarray(new))
  # d/dlp of -A r is -A r where the unclipped term is the larger; 0 where clipping binds.
  want_grad = -adv[:, None] * ratios[None, :]
  want_grad[0, 4] = 0.0
  want_grad[1, 0] = 0.0
  np.testing.assert_allclose(grad, want_grad, rtol=RTOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_aggregation_with_an_all_masked_row(seed, mode):
  rng = np.random.default_rng(seed)
  values = rng.normal(0, 1, (6, 10))
  _, _, mask = draw(rng)
  s, w = grpo.aggregate(values, mask, mode, norm_constant=64.0)
  np.testing.assert_allclose(s / w, np_aggregate(values, mask, mode, 64.0), rtol=RTOL)
  # Micro-batches add up to the whole batch.
  halves = [grpo.aggregate(values[r], mask[r], mode, norm_constant=64.0) for r in (slice(0, 3), slice(3, 6))]
  np.testing.assert_allclose(sum(h[0] for h in halves) / sum(h[1] for h in halves), s / w, rtol=1e-12)


def test_aggregation_refuses_unknown_modes_and_a_missing_constant():
  with pytest.raises(ValueError, match="unknown aggregation"):
    grpo.aggregate(np.ones((1, 2)), np.ones((1, 2)), "mean")
  with pytest.raises(ValueError, match="norm_constant"):
    grpo.aggregate(np.ones((1, 2)), np.ones((1, 2)), "sequence_sum")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_policy_loss_with_kl_and_entropy(seed, mode, estimator):
  rng = np.random.default_rng(seed)
  new, old, mask = draw(rng)
  ref = old + rng.normal(0, 0.2, old.shape)
  entropy = rng.uniform(0, 3, old.shape)
  weights = rng.uniform(0, 2, old.shape)
  adv = rng.normal(0, 1, len(mask))
  loss, metrics = grpo.policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=mode,
                                   norm_constant=32.0, ref_logprobs=ref, kl_coef=0.04, kl_estimator=estimator,
                                   entropy=entropy, entropy_coef=0.01, weights=weights)
  surrogate, ratios = np_token_losses(new, old, adv, mask, 0.2, 0.28, None, False)
  d = ref - new
  kl = -d if estimator == "k1" else np.exp(d) - 1 - d
  per_token = surrogate * weights + 0.04 * kl - 0.01 * entropy
  np.testing.assert_allclose(loss, np_aggregate(per_token, mask, mode, 32.0), rtol=RTOL)
  np.testing.assert_allclose(metrics["kl"], np_aggregate(kl, mask, mode, 32.0), rtol=RTOL)
  np.testing.assert_allclose(metrics["entropy"], np_aggregate(entropy, mask, mode, 32.0), rtol=RTOL)
  np.testing.assert_allclose(metrics["policy_loss"], np_aggregate(surrogate * weights, mask, mode, 32.0), rtol=RTOL)
  np.testing.assert_allclose(metrics["ratio"], np_aggregate(ratios, mask, mode, 32.0), rtol=RTOL)


def test_gspo_ratio_is_the_exp_of_the_mean_token_log_ratio_and_its_gradient_the_sequence_objective():
  rng = np.random.default_rng(4)
  new, old, mask = draw(rng)
  adv = rng.normal(0, 1, len(mask))
  _, parts = grpo.token_losses(new, old, adv, mask, eps_low=3e-4, eps_high=4e-4, ratio="sequence")
  for i in range(len(mask)):
    on = mask[i] > 0
    if on.any():
      np.testing.assert_allclose(np.asarray(parts["ratio"])[i][on], np.exp(np.mean(new[i][on] - old[i][on])), rtol=RTOL)
  # With wide clips nothing binds, and the sequence-mean loss has the gradient of GSPO's
  # -mean_i(s_i A_i) over the sequences with tokens.
  settings = dict(eps_low=10.0, eps_high=10.0, ratio="sequence", aggregation="sequence_mean")
  grad = jax.grad(lambda lp: grpo.policy_loss(lp, old, adv, mask, **settings)[0])(jnp.asarray(new))

  def sequence_objective(lp):
    rows = jnp.sum(mask, axis=1) > 0
    s = jnp.exp(grpo.sequence_log_ratio(lp, old, mask))
    return -jnp.sum(jnp.where(rows, s * adv, 0.0)) / jnp.sum(rows)

  np.testing.assert_allclose(grad, jax.grad(sequence_objective)(jnp.asarray(new)), rtol=RTOL, atol=1e-12)


def test_a_batch_with_nothing_masked_in_gives_zero():
  new, old = np.full((2, 4), -1.0), np.full((2, 4), -1.2)
  for mode in ("token_mean", "sequence_mean"):
    loss, _ = grpo.policy_loss(new, old, np.ones(2), np.zeros((2, 4)), aggregation=mode)
    assert float(loss) == 0.0
