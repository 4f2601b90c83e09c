"""DPO family, SimPO and ORPO against float64 numpy: NeMo-Aligner's formulas and TRL's published ones.

NeMo-Aligner (``MegatronGPTDPOModel.loss_func``) and TRL (``DPOTrainer.dpo_loss``, ``CPOTrainer``,
``ORPOTrainer.odds_ratio_loss``) are each written out below in their own form. DPO and IPO agree between
the two on the same Delta; the one difference is upstream: TRL's IPO always feeds length-averaged
log-probs, NeMo only with ``preference_average_log_probs`` (tested via ``sequence_logprobs``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import dpo

SEEDS = [0, 3, 17, 2024]
NEMO_TYPES = ("dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl")


pytestmark = pytest.mark.usefixtures("x64")


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def nemo_reference(pi_c, pi_r, ref_c, ref_r, beta, loss_type, r_c=None, r_r=None, eta=1.0):
  """NeMo-Aligner §2.5, with the Bernoulli KLs written on probabilities rather than log-sigmoids."""
  delta = (pi_c - ref_c) - (pi_r - ref_r)
  if loss_type == "dpo":
    per = -np.log(sigmoid(beta * delta))
  elif loss_type == "ipo":
    per = (delta - 1.0 / (2.0 * beta)) ** 2
  else:
    gt = eta * (r_c - r_r)
    if loss_type == "rpo_sq":
      per = (beta * delta - gt) ** 2
    else:
      p, q = sigmoid(beta * delta), sigmoid(gt)  # model, target
      if loss_type == "rpo_bwd_kl":
        p, q = q, p
      per = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  return per.mean()


def trl_dpo(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=0.0, loss_type="sigmoid"):
  """TRL DPOTrainer.dpo_loss: logits = pi_logratios - ref_logratios."""
  logits = (pi_c - pi_r) - (ref_c - ref_r)
  if loss_type == "sigmoid":
    losses = -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
  else:  # ipo
    losses = (logits - 1 / (2 * beta)) ** 2
  return losses.mean()


def trl_simpo(pi_c, pi_r, beta, gamma, label_smoothing=0.0):
  """TRL CPOTrainer(loss_type="simpo"): logits = pi_c - pi_r - gamma/beta, sigmoid loss on beta*logits."""
  logits = (pi_c - pi_r) - gamma / beta
  return (-logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing).mean()


def trl_orpo(c, r, nll, lam):
  """TRL ORPOTrainer: log_odds via log1p(-exp(.)); loss = nll - mean(beta * logsigmoid(log_odds))."""
  log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
  return np.mean(nll) - np.mean(lam * logsigmoid(log_odds)), log_odds


def draw(seed, b=None):
  rng = np.random.default_rng(seed)
  b = b or int(rng.integers(2, 20))
  pi_c, pi_r = rng.uniform(-80, -10, b), rng.uniform(-80, -10, b)
  ref_c, ref_r = pi_c + rng.normal(0, 2, b), pi_r + rng.normal(0, 2, b)
  r_c, r_r = rng.normal(1.0, 1.0, b), rng.normal(0.0, 1.0, b)
  return pi_c, pi_r, ref_c, ref_r, r_c, r_r


class TestNemoTypes:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("loss_type", NEMO_TYPES)
  @pytest.mark.parametrize("beta", [0.1, 0.2, 1.0])
  def test_matches_nemo_formula(self, seed, loss_type, beta):
    pi_c, pi_r, ref_c, ref_r, r_c, r_r = draw(seed)
    eta = 1.0 if seed % 2 else 2.5
    got, metrics = dpo.loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type, chosen_rewards=r_c,
                            rejected_rewards=r_r, gt_reward_scale=eta)
    assert got.dtype == jnp.float64
    want = nemo_reference(pi_c, pi_r, ref_c, ref_r, beta, loss_type, r_c, r_r, eta)
    np.testing.assert_allclose(float(got), want, rtol=1e-11)
    rho_c, rho_r = pi_c - ref_c, pi_r - ref_r
    np.testing.assert_allclose(float(metrics["rewards_chosen_mean"]), np.mean(beta * rho_c), rtol=1e-11)
    np.testing.assert_allclose(float(metrics["rewards_rejected_mean"]), np.mean(beta * rho_r), rtol=1e-11)
    np.testing.assert_allclose(float(metrics["reward_margin_mean"]), np.mean(beta * (rho_c - rho_r)),
                               rtol=1e-11)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(rho_c > rho_r), rtol=1e-14)

  @pytest.mark.parametrize("seed", SEEDS)
  def test_float32_inputs(self, seed):
    f32 = [x.astype(np.float32) for x in draw(seed)]
    pi_c, pi_r, ref_c, ref_r, r_c, r_r = f32
    f64 = [x.astype(np.float64) for x in f32]
    for loss_type in NEMO_TYPES:
      got, _ = dpo.loss(pi_c, pi_r, ref_c, ref_r, loss_type=loss_type, chosen_rewards=r_c, rejected_rewards=r_r)
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(float(got), nemo_reference(*f64[:4], 0.2, loss_type, *f64[4:]), rtol=1e-5)

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.5])
  def test_dpo_and_cdpo_match_trl(self, seed, eps):
    pi_c, pi_r, ref_c, ref_r, _, _ = draw(seed)
    got, _ = dpo.loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=eps)
    np.testing.assert_allclose(float(got), trl_dpo(pi_c, pi_r, ref_c, ref_r, 0.1, eps), rtol=1e-11)

  @pytest.mark.parametrize("seed", SEEDS)
  def test_ipo_matches_trl_on_averaged_logprobs(self, seed):
    rng = np.random.default_rng(seed)
    b, t = 4, 9
    tok = {k: rng.uniform(-4, -0.01, (b, t)) for k in ("pc", "pr", "rc", "rr")}
    mask_c = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None])
    mask_r = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None])
    avg = lambda x, m: (x * m).sum(-1) / m.sum(-1)  # noqa: E731  (TRL divides by the completion size)
    seqs = [dpo.sequence_logprobs(tok[k], m, average=True)
            for k, m in (("pc", mask_c), ("pr", mask_r), ("rc", mask_c), ("rr", mask_r))]
    got, _ = dpo.loss(*seqs, beta=0.3, loss_type="ipo")
    want = trl_dpo(avg(tok["pc"], mask_c), avg(tok["pr"], mask_r), avg(tok["rc"], mask_c),
                   avg(tok["rr"], mask_r), 0.3, loss_type="ipo")
    np.testing.assert_allclose(float(got), want, rtol=1e-11)
    # NeMo's default (summed log-probs) is a different number on the same tokens.
    summed = [dpo.sequence_logprobs(tok[k], m) for k, m in (("pc", mask_c), ("pr", mask_r), ("rc", mask_c),
                                                             ("rr", mask_r))]
    assert abs(float(dpo.loss(*summed, beta=0.3, loss_type="ipo")[0]) - want) > 1e-6

  @pytest.mark.parametrize("dtype", [np.float32, np.float64])
  def test_dpo_at_reference_is_log2(self, dtype):
    rng = np.random.default_rng(5)
    pi_c, pi_r = rng.uniform(-50, -1, 6).astype(dtype), rng.uniform(-50, -1, 6).astype(dtype)
    got, metrics = dpo.loss(pi_c, pi_r, pi_c, pi_r)
    tol = 1e-15 if dtype == np.float64 else 1e-7
    assert abs(float(got) - math.log(2.0)) <= tol
    assert float(metrics["accuracy"]) == 0.0 and float(metrics["reward_margin_mean"]) == 0.0
    # ... and so does cDPO (both of its terms are log 2 there).
    assert abs(float(dpo.loss(pi_c, pi_r, pi_c, pi_r, label_smoothing=0.2)[0]) - math.log(2.0)) <= tol

  def test_ipo_minimum_at_half_inverse_beta(self):
    z = np.zeros(3)
    got, _ = dpo.loss(z + 1.0 / (2 * 0.25), z, z, z, beta=0.25, loss_type="ipo")
    assert float(got) == 0.0

  @pytest.mark.parametrize("seed", SEEDS)
  def test_dpo_gradient(self, seed):
    pi_c, pi_r, ref_c, ref_r, _, _ = draw(seed)
    beta, eps, b = 0.2, 0.1, len(pi_c)
    g = jax.grad(lambda c, r: dpo.loss(c, r, ref_c, ref_r, beta=beta, label_smoothing=eps)[0], argnums=(0, 1))
    g_c, g_r = g(pi_c, pi_r)
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    want = -beta * ((1 - eps) * (1 - sigmoid(z)) - eps * sigmoid(z)) / b
    np.testing.assert_allclose(np.asarray(g_c), want, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(g_r), -want, rtol=1e-10)
    # The reference log-probs are inputs like any other; callers pass them without gradient.

  def test_rpo_kl_zero_when_model_matches_target(self):
    pi_c, pi_r, ref_c, ref_r, r_c, _ = draw(1, b=5)
    beta = 0.5
    r_r = r_c - beta * ((pi_c - ref_c) - (pi_r - ref_r))
    for loss_type in ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"):
      got, _ = dpo.loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type, chosen_rewards=r_c,
                        rejected_rewards=r_r)
      assert abs(float(got)) < 1e-12, loss_type

  def test_rpo_fwd_and_bwd_differ(self):
    args = draw(2, b=8)
    fwd = float(dpo.loss(*args[:4], loss_type="rpo_fwd_kl", chosen_rewards=args[4], rejected_rewards=args[5])[0])
    bwd = float(dpo.loss(*args[:4], loss_type="rpo_bwd_kl", chosen_rewards=args[4], rejected_rewards=args[5])[0])
    assert fwd > 0 and bwd > 0 and abs(fwd - bwd) > 1e-6


  def test_jit_with_traced_hyperparameters(self):
    pi_c, pi_r, ref_c, ref_r, r_c, r_r = draw(6)
    for loss_type in NEMO_TYPES:
      f = jax.jit(lambda *a, lt=loss_type: dpo.loss(*a[:4], beta=a[6], loss_type=lt, chosen_rewards=a[4],
                                                     rejected_rewards=a[5], gt_reward_scale=a[7])[0])
      np.testing.assert_allclose(float(f(pi_c, pi_r, ref_c, ref_r, r_c, r_r, 0.3, 2.0)),
                                 nemo_reference(pi_c, pi_r, ref_c, ref_r, 0.3, loss_type, r_c, r_r, 2.0), rtol=1e-11)


class TestSimPO:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
  @pytest.mark.parametrize("eps", [0.0, 0.2])
  def test_matches_trl(self, seed, gamma, eps):
    rng = np.random.default_rng(seed)
    c, r = rng.uniform(-3, -0.1, 7), rng.uniform(-3, -0.1, 7)
    got, metrics = dpo.loss(c, r, None, None, beta=2.0, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps)
    np.testing.assert_allclose(float(got), trl_simpo(c, r, 2.0, gamma, eps), rtol=1e-11)
    np.testing.assert_allclose(float(metrics["rewards_chosen_mean"]), np.mean(2.0 * c), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(c > r), rtol=1e-14)

  def test_reference_is_ignored(self):
    rng = np.random.default_rng(1)
    c, r = rng.uniform(-3, -0.1, 4), rng.uniform(-3, -0.1, 4)
    a = dpo.loss(c, r, None, None, loss_type="simpo")[0]
    b = dpo.loss(c, r, rng.normal(size=4), rng.normal(size=4), loss_type="simpo")[0]
    assert float(a) == float(b)


class TestORPO:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("lam", [0.1, 0.5])
  def test_matches_trl(self, seed, lam):
    rng = np.random.default_rng(seed)
    b = 6
    c, r = rng.uniform(-4, -1e-3, b), rng.uniform(-4, -1e-3, b)
    nll = -c
    got, metrics = dpo.orpo_loss(c, r, nll, lam=lam)
    want, log_odds = trl_orpo(c, r, nll, lam)
    np.testing.assert_allclose(float(got), want, rtol=1e-11)
    np.testing.assert_allclose(float(metrics["log_odds_ratio_mean"]), log_odds.mean(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(metrics["nll"]), nll.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(log_odds > 0), rtol=1e-14)

  def test_log_odds_accurate_near_zero_and_far(self):
    x = np.array([-1e-12, -1e-6, -0.3, -0.7, -5.0, -40.0])
    p = np.exp(x)
    want = np.log(p) - np.log(-np.expm1(x))  # exact-in-float64 for every x here
    np.testing.assert_allclose(np.asarray(dpo.log_odds(x)), want, rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(jax.vmap(jax.grad(dpo.log_odds))(x))))

  def test_scalar_nll_and_negative_lam(self):
    c, r = np.array([-0.5, -1.0]), np.array([-2.0, -0.2])
    a = dpo.orpo_loss(c, r, 1.5, lam=0.2)[0]
    b = dpo.orpo_loss(c, r, np.array([1.0, 2.0]), lam=0.2)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-15)
    with pytest.raises(ValueError, match="lam"):
      dpo.orpo_loss(c, r, 1.0, lam=-1.0)


class TestSequenceLogprobs:

  @pytest.mark.parametrize("seed", SEEDS)
  def test_sum_and_average(self, seed):
    rng = np.random.default_rng(seed)
    b, t = 5, 13
    lp = rng.uniform(-6, 0, (b, t))
    mask = rng.random((b, t)) < 0.6
    mask[0] = False
    lp_bad = np.where(mask, lp, -np.inf)  # masked positions may hold anything
    want_sum = np.array([sum(lp[i, j] for j in range(t) if mask[i, j]) for i in range(b)])
    counts = mask.sum(-1)
    np.testing.assert_allclose(np.asarray(dpo.sequence_logprobs(lp_bad, mask)), want_sum, rtol=1e-12)
    got_avg = np.asarray(dpo.sequence_logprobs(lp_bad, mask.astype(np.float32), average=True))
    np.testing.assert_allclose(got_avg, np.where(counts > 0, want_sum / np.maximum(counts, 1), 0.0), rtol=1e-12)
    assert got_avg[0] == 0.0
    g = np.asarray(jax.grad(lambda x: dpo.sequence_logprobs(x, mask).sum())(lp_bad))
    np.testing.assert_array_equal(g, mask.astype(np.float64))

  def test_shape_error(self):
    with pytest.raises(ValueError, match="mask"):
      dpo.sequence_logprobs(np.zeros((2, 3)), np.ones((2, 4)))


class TestErrors:

  def test_unknown_loss_type_lists_valid_ones(self):
    z = np.zeros(2)
    with pytest.raises(ValueError) as e:
      dpo.loss(z, z, z, z, loss_type="hinge")
    for name in dpo.LOSS_TYPES:
      assert name in str(e.value)

  @pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
  def test_rpo_needs_rewards(self, loss_type):
    z = np.zeros(2)
    with pytest.raises(ValueError, match="chosen_rewards"):
      dpo.loss(z, z, z, z, loss_type=loss_type)
    with pytest.raises(ValueError, match="rejected_rewards"):
      dpo.loss(z, z, z, z, loss_type=loss_type, chosen_rewards=z)

  def test_bad_arguments(self):
    z = np.zeros(3)
    with pytest.raises(ValueError, match="beta"):
      dpo.loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
      dpo.loss(z, z, z, z, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
      dpo.loss(z, z, z, z, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_chosen"):
      dpo.loss(z, z, None, None)
    with pytest.raises(ValueError, match="must match"):
      dpo.loss(z, z[:2], z, z)
    with pytest.raises(ValueError, match="must match"):
      dpo.loss(z, z, z[:2], z)
