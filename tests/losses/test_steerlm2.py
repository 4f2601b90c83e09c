"""SteerLM 2.0 against a float64 numpy re-enactment of NeMo-Aligner's ``GPTSteerLMModel`` procedure.

The reference walks the groups one by one as NeMo does: baseline softmax per group, weight = w - b,
micro-batches of ``mbs`` samples each normalised by (mean token count / micro-batches per group), and
Megatron's mean over all micro-batches. The jalign loss gets the same samples flattened and shuffled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import steerlm2

SEEDS = [0, 1, 31, 77]


pytestmark = pytest.mark.usefixtures("x64")


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def make_groups(seed, n_groups=None, n=None):
  rng = np.random.default_rng(seed)
  n_groups = n_groups or int(rng.integers(1, 5))
  n = n or int(rng.choice([2, 4, 6]))
  groups = []
  for _ in range(n_groups):
    ntok = rng.integers(5, 60, n).astype(np.float64)
    nll = ntok * rng.uniform(0.5, 2.5, n)  # summed response NLL
    log_p_attr, log_p_y = rng.normal(-3, 1, n), -ntok * rng.uniform(0.8, 2.0, n)
    log_q_prime = -nll + rng.normal(0, 1.5, n)
    ws = np_softmax(log_p_attr + log_p_y - log_q_prime)  # NeMo's dataset: scipy.special.softmax
    groups.append(dict(nll=nll, ntok=ntok, log_p_attr=log_p_attr, log_p_y=log_p_y, log_q_prime=log_q_prime, ws=ws))
  return groups


def nemo_steerlm2(groups, mbs):
  ub_losses, distances = [], []
  for g in groups:
    base = -g["nll"] - g["log_q_prime"]
    p = np_softmax(base)
    weight = g["ws"] - p
    n = len(base)
    m = n // mbs
    avg_tokens_in_ub = g["ntok"].mean() / m
    for j in range(m):
      sl = slice(j * mbs, (j + 1) * mbs)
      ub_losses.append(np.sum(weight[sl] * g["nll"][sl]) / avg_tokens_in_ub)
    wp, bp = g["ws"] + 1e-8, p + 1e-8
    distances.append(np.sum(wp * np.log(wp / bp)))
  return np.mean(ub_losses), np.mean(distances)


def flatten(groups, seed):
  """Concatenate the groups, give them arbitrary ids and shuffle the samples."""
  rng = np.random.default_rng(seed + 1000)
  ids = rng.choice(np.arange(100, 200), len(groups), replace=False)
  cols = {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}
  cols["gid"] = np.concatenate([np.full(len(g["nll"]), i) for g, i in zip(groups, ids)])
  order = rng.permutation(len(cols["gid"]))
  return {k: v[order] for k, v in cols.items()}


class TestLoss:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("mbs", [1, 2])
  def test_matches_nemo_procedure(self, seed, mbs):
    groups = make_groups(seed)
    want, want_distance = nemo_steerlm2(groups, mbs)
    f = flatten(groups, seed)
    got, metrics = steerlm2.loss(-f["nll"], f["log_q_prime"], f["ws"], f["gid"], f["ntok"])
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
    np.testing.assert_allclose(float(metrics["distance"]), want_distance, rtol=1e-10)
    assert float(metrics["num_groups"]) == len(groups)
    np.testing.assert_allclose(float(metrics["nll_per_token"]), np.mean(f["nll"] / f["ntok"]), rtol=1e-12)

  def test_micro_batch_size_does_not_change_nemo_loss(self):
    groups = make_groups(3, n_groups=2, n=6)
    values = [nemo_steerlm2(groups, mbs)[0] for mbs in (1, 2, 3, 6)]
    np.testing.assert_allclose(values, values[0], rtol=1e-12)

  @pytest.mark.parametrize("seed", SEEDS)
  def test_gradient_is_weighted_score_with_detached_baseline(self, seed):
    groups = make_groups(seed, n_groups=3, n=4)
    f = flatten(groups, seed)
    g = np.asarray(jax.grad(lambda lq: steerlm2.loss(lq, f["log_q_prime"], f["ws"], f["gid"], f["ntok"])[0])(
        -f["nll"]))
    want = np.zeros_like(g)
    for gid in np.unique(f["gid"]):
      sel = f["gid"] == gid
      b = np_softmax(-f["nll"][sel] - f["log_q_prime"][sel])
      want[sel] = -(f["ws"][sel] - b) / (f["ntok"][sel].mean() * 3)
    np.testing.assert_allclose(g, want, rtol=1e-10)

  def test_zero_loss_and_distance_when_model_is_the_target(self):
    groups = make_groups(5, n_groups=2, n=4)
    for g in groups:  # log Q_theta - log Q' equal to the importance log-weights -> b == w
      g["nll"] = -(g["log_p_attr"] + g["log_p_y"])
    f = flatten(groups, 5)
    got, metrics = steerlm2.loss(-f["nll"], f["log_q_prime"], f["ws"], f["gid"], f["ntok"])
    assert abs(float(got)) < 1e-12 and abs(float(metrics["distance"])) < 1e-12

  def test_float32(self):
    f = flatten(make_groups(8, n_groups=2, n=4), 8)
    args = [f[k].astype(np.float32) for k in ("nll", "log_q_prime", "ws")]
    got, _ = steerlm2.loss(-args[0], args[1], args[2], f["gid"], f["ntok"].astype(np.float32))
    assert got.dtype == jnp.float32
    want, _ = steerlm2.loss(-args[0].astype(np.float64), args[1].astype(np.float64), args[2].astype(np.float64),
                            f["gid"], f["ntok"])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)

  def test_errors(self):
    z = np.zeros(4)
    with pytest.raises(ValueError, match="weights"):
      steerlm2.loss(z, z, z[:3], np.zeros(4, int), z)
    with pytest.raises(ValueError, match="group_ids"):
      steerlm2.loss(z, z, z, np.zeros(3, int), z)
    with pytest.raises(ValueError, match="group_ids"):
      steerlm2.loss(z, z, z, np.zeros((2, 2), int), z)


class TestWeights:

  @pytest.mark.parametrize("seed", SEEDS)
  def test_importance_weights_and_baseline_are_group_softmaxes(self, seed):
    groups = make_groups(seed, n_groups=3)
    f = flatten(groups, seed)
    w = np.asarray(steerlm2.importance_weights(f["log_p_attr"], f["log_p_y"], f["log_q_prime"], f["gid"]))
    np.testing.assert_allclose(w, f["ws"], rtol=1e-12)
    b = np.asarray(steerlm2.baseline(-f["nll"], f["log_q_prime"], f["gid"]))
    for gid in np.unique(f["gid"]):
      sel = f["gid"] == gid
      np.testing.assert_allclose(b[sel], np_softmax(-f["nll"][sel] - f["log_q_prime"][sel]), rtol=1e-12)
      np.testing.assert_allclose(w[sel].sum(), 1.0, rtol=1e-12)

  def test_group_softmax_extreme_logits(self):
    x = np.array([1000.0, -1000.0, 999.0, 0.0, -1e4])
    gid = np.array([0, 1, 0, 1, 2])
    got = np.asarray(steerlm2.group_softmax(x, gid))
    want = np.array([1 / (1 + np.exp(-1.0)), 0.0, np.exp(-1.0) / (1 + np.exp(-1.0)), 1.0, 1.0])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda v: steerlm2.group_softmax(v, gid)[0])(x))))


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_samples_take_no_part(seed):
  """Samples with sample_mask 0 (empty slots, padding rows) change neither the loss, its gradient nor
  the metrics: the result equals that of the real samples alone."""
  rng = np.random.default_rng(seed)
  b = 10
  logq = jnp.asarray(-rng.uniform(5, 50, b))
  qp, w = jnp.asarray(-rng.uniform(5, 50, b)), jnp.asarray(rng.uniform(0, 1, b))
  groups = jnp.asarray(rng.integers(0, 3, b))
  ntok = jnp.asarray(rng.integers(3, 30, b).astype(np.float64))
  mask = rng.random(b) < 0.6
  mask[0] = True
  keep = np.flatnonzero(mask)
  f = lambda lq, m: steerlm2.loss(lq, qp, w, groups, ntok, sample_mask=m)
  (value, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logq, jnp.asarray(mask, jnp.float64))
  sub = lambda x: x[keep]
  g = lambda lq: steerlm2.loss(lq, sub(qp), sub(w), sub(groups), sub(ntok))
  (want, want_metrics), want_grad = jax.jit(jax.value_and_grad(g, has_aux=True))(sub(logq))
  np.testing.assert_allclose(value, want, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad)[keep], want_grad, rtol=1e-12)
  assert np.all(np.asarray(grad)[~mask] == 0)
  for k in want_metrics:
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-12)
