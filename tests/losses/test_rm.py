"""Reward-model losses and read-out helpers against float64 numpy written from the NeMo-Aligner formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import rm

SEEDS = [0, 1, 7, 123]
# The losses as a train step calls them, jitted: one compiled program per call shape instead of one per
# primitive when called eagerly.
bt_loss = jax.jit(rm.bt_loss, static_argnames="kind")
regression_loss = jax.jit(rm.regression_loss, static_argnames="mask_value")


pytestmark = pytest.mark.usefixtures("x64")


def np_neg_log_sigmoid(x):
  return np.log1p(np.exp(-x)) if np.all(x > -30) else np.logaddexp(0.0, -x)


def np_bt(r_c, r_r, kind, strength=None):
  """Per pair, then the mean: regular -log s(d), margin -log s(d - |l|), scaled |l| * -log s(d)."""
  out = []
  for i in range(len(r_c)):
    d = r_c[i] - r_r[i]
    if kind == "regular":
      out.append(np.log(1.0 + np.exp(-d)))
    elif kind == "margin":
      out.append(np.log(1.0 + np.exp(-(d - abs(strength[i])))))
    else:
      out.append(abs(strength[i]) * np.log(1.0 + np.exp(-d)))
  return float(np.mean(out))


def _pairs(seed, b=None):
  rng = np.random.default_rng(seed)
  b = b or int(rng.integers(3, 17))
  r_c = rng.normal(0.5, 2.0, b)
  r_r = rng.normal(0.0, 2.0, b)
  strength = rng.integers(-3, 4, b).astype(np.float64)  # HelpSteer2-Preference label[0] in -3..3
  return r_c, r_r, strength


class TestBradleyTerry:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("kind", rm.BT_KINDS)
  def test_matches_numpy(self, seed, kind):
    r_c, r_r, s = _pairs(seed)
    loss, metrics = bt_loss(r_c, r_r, kind=kind, strength=None if kind == "regular" else s)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), np_bt(r_c, r_r, kind, s), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(r_c > r_r), rtol=1e-14)
    np.testing.assert_allclose(float(metrics["rewards_chosen_mean"]), r_c.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["rewards_rejected_mean"]), r_r.mean(), rtol=1e-12)
    both = np.concatenate([r_c, r_r])
    np.testing.assert_allclose(float(metrics["rewards_all_mean"]), both.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(metrics["rewards_all_std"]), both.std(), rtol=1e-12)

  @pytest.mark.parametrize("seed", SEEDS)
  def test_float32_inputs(self, seed):
    r_c, r_r, s = _pairs(seed)
    for kind in rm.BT_KINDS:
      loss, _ = bt_loss(r_c.astype(np.float32), r_r.astype(np.float32), kind=kind,
                           strength=s.astype(np.float32))
      assert loss.dtype == jnp.float32
      np.testing.assert_allclose(float(loss), np_bt(r_c.astype(np.float32).astype(np.float64),
                                                    r_r.astype(np.float32).astype(np.float64), kind, s),
                                 rtol=1e-5)

  def test_nemo_names_are_aliases(self):
    r_c, r_r, s = _pairs(3)
    for kind in rm.BT_KINDS:
      a, _ = bt_loss(r_c, r_r, kind=kind, strength=s)
      b, _ = bt_loss(r_c, r_r, kind=f"{kind}_bt", strength=s)
      assert float(a) == float(b)

  def test_variants_differ_and_sign_of_strength_is_ignored(self):
    r_c, r_r, s = _pairs(5, b=8)
    s = np.where(s == 0, 2.0, s)
    values = {k: float(bt_loss(r_c, r_r, kind=k, strength=s)[0]) for k in rm.BT_KINDS}
    assert len(set(values.values())) == 3
    for k in ("margin", "scaled"):
      assert float(bt_loss(r_c, r_r, kind=k, strength=-s)[0]) == values[k]

  def test_margin_zero_strength_is_regular_and_scaled_zero_is_zero(self):
    r_c, r_r, _ = _pairs(9)
    zeros = np.zeros_like(r_c)
    reg = float(bt_loss(r_c, r_r)[0])
    np.testing.assert_allclose(float(bt_loss(r_c, r_r, kind="margin", strength=zeros)[0]), reg, rtol=1e-15)
    assert float(bt_loss(r_c, r_r, kind="scaled", strength=zeros)[0]) == 0.0

  def test_gradient(self):
    r_c, r_r, s = _pairs(11)
    b = len(r_c)
    g_c, g_r = jax.grad(lambda c, r: bt_loss(c, r, kind="margin", strength=s)[0], argnums=(0, 1))(r_c, r_r)
    sig = 1.0 / (1.0 + np.exp(-(r_c - r_r - np.abs(s))))
    np.testing.assert_allclose(np.asarray(g_c), -(1.0 - sig) / b, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g_r), (1.0 - sig) / b, rtol=1e-12)

  def test_errors(self):
    r_c, r_r, s = _pairs(0, b=4)
    for kind in ("margin", "scaled"):
      with pytest.raises(ValueError, match=kind):
        bt_loss(r_c, r_r, kind=kind)
    with pytest.raises(ValueError, match="regular"):
      bt_loss(r_c, r_r, kind="hinge")
    with pytest.raises(ValueError, match="shape"):
      bt_loss(r_c, r_r[:3])
    with pytest.raises(ValueError, match="strength"):
      bt_loss(r_c, r_r, kind="margin", strength=s[:2])


class TestRegression:

  @staticmethod
  def np_regression(pred, labels, mask_value):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
      for a in range(pred.shape[1]):
        if labels[b, a] != mask_value:
          total += (pred[b, a] - labels[b, a]) ** 2
          count += 1
    return total / count, count

  @pytest.mark.parametrize("seed", SEEDS)
  def test_matches_numpy(self, seed):
    rng = np.random.default_rng(seed)
    b, a = int(rng.integers(2, 9)), 9
    pred = rng.normal(2.0, 1.5, (b, a))
    labels = rng.integers(0, 5, (b, a)).astype(np.float64)
    labels[rng.random((b, a)) < 0.4] = -100.0
    labels[0, 0] = 3.0
    loss, metrics = regression_loss(pred, labels)
    want, count = self.np_regression(pred, labels, -100.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)
    assert float(metrics["num_labelled"]) == count
    # The mean is over labelled entries, not over all B*A entries (which would be smaller).
    assert count < b * a and float(loss) > want * count / (b * a)

  def test_custom_mask_value_and_masked_predictions_do_not_matter(self):
    rng = np.random.default_rng(4)
    pred, labels = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    labels[1] = -1.0
    loss, _ = regression_loss(pred, labels, mask_value=-1.0)
    pred2 = pred.copy()
    pred2[1] = 1e6
    assert float(regression_loss(pred2, labels, mask_value=-1.0)[0]) == float(loss)
    np.testing.assert_allclose(float(loss), self.np_regression(pred, labels, -1.0)[0], rtol=1e-12)

  def test_gradient_only_on_labelled(self):
    rng = np.random.default_rng(8)
    pred, labels = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    labels[rng.random((4, 3)) < 0.5] = -100.0
    labels[0, 0] = 0.5
    mask = labels != -100.0
    g = np.asarray(jax.grad(lambda p: regression_loss(p, labels)[0])(pred))
    np.testing.assert_allclose(g, np.where(mask, 2.0 * (pred - labels) / mask.sum(), 0.0), rtol=1e-12)

  def test_all_masked_is_zero_not_nan(self):
    loss, metrics = regression_loss(np.ones((2, 3)), np.full((2, 3), -100.0))
    assert float(loss) == 0.0 and float(metrics["num_labelled"]) == 0.0

  def test_shape_error(self):
    with pytest.raises(ValueError, match="shape"):
      regression_loss(np.ones((2, 3)), np.ones((2, 4)))


class TestReadout:

  @pytest.mark.parametrize("seed", SEEDS)
  def test_gather_last_and_last_token_index(self, seed):
    rng = np.random.default_rng(seed)
    b, t, h = 5, 11, 3
    hidden = rng.normal(size=(b, t, h))
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    want = np.stack([hidden[i, lengths[i] - 1] for i in range(b)])
    np.testing.assert_array_equal(np.asarray(rm.gather_last(hidden, lengths)), want)
    np.testing.assert_array_equal(np.asarray(rm.last_token_index(mask)), lengths - 1)
    # [B, T] per-position scores (a critic-style head output) work too.
    np.testing.assert_array_equal(np.asarray(rm.gather_last(hidden[..., 0], lengths)), want[:, 0])

  def test_last_token_index_left_padding_and_empty(self):
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(rm.last_token_index(mask)), [4, 1, 0, 2])

  @pytest.mark.parametrize("seed", SEEDS)
  def test_mean_pool(self, seed):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(4, 7, 2))
    lengths = rng.integers(1, 8, 4)
    want = np.stack([hidden[i, :lengths[i]].mean(0) for i in range(4)])
    np.testing.assert_allclose(np.asarray(rm.mean_pool(hidden, lengths)), want, rtol=1e-12)

  def test_merge_attributes_and_standardize(self):
    rng = np.random.default_rng(2)
    r = rng.normal(size=(6, 9))
    np.testing.assert_allclose(np.asarray(rm.merge_attributes(r)), r.mean(-1), rtol=1e-12)
    w = rng.random(9)
    np.testing.assert_allclose(np.asarray(rm.merge_attributes(r, w)), r @ w, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rm.standardize(r[:, 0], 0.3, 2.5)), (r[:, 0] - 0.3) / 2.5,
                               rtol=1e-12)
    with pytest.raises(ValueError, match="std"):
      rm.standardize(r[:, 0], 0.0, 0.0)
    with pytest.raises(ValueError, match="weights"):
      rm.merge_attributes(r, w[:3])
