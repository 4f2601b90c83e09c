"""Top-K knowledge distillation against float64 numpy and NeMo-Aligner's hand-written backward.

``_TopKLogitsCrossEntropy.backward`` in NeMo-Aligner gives, per token and w.r.t. the student's top-K
logits: fwd_kl -> p_S - p_T; bwd_kl -> p_S * (log p_S - log p_T - KL). The autodiff gradient of
jalign's loss is checked against those closed forms (times the logits scale and the mask weight).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import kd

SEEDS = [0, 2, 11, 500]


pytestmark = pytest.mark.usefixtures("x64")


def np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def draw(seed, b=3, t=7, v=50, k=None):
  rng = np.random.default_rng(seed)
  k = k or int(rng.integers(2, 9))
  student_logits = rng.normal(0, 3, (b, t, v))
  teacher_logits = rng.normal(0, 3, (b, t, v))
  ids = np.argsort(-teacher_logits, axis=-1)[..., :k]  # teacher top-K, descending
  teacher_topk = np.take_along_axis(teacher_logits, ids, -1)
  labels = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) < 0.7).astype(np.float64)
  mask[0, 0] = 1.0
  return student_logits, teacher_topk, ids, labels, mask


def np_kd(student_logits, teacher_topk, ids, labels, mask, kind, kd_w, sft_w, s_s, s_t):
  b, t, _ = student_logits.shape
  kd_tok = np.zeros((b, t))
  ce_tok = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      zs = s_s * student_logits[i, j, ids[i, j]]
      zt = s_t * teacher_topk[i, j]
      p_s = np.exp(zs) / np.exp(zs).sum()
      p_t = np.exp(zt) / np.exp(zt).sum()
      if kind == "fwd_kl":
        kd_tok[i, j] = np.sum(p_t * np.log(p_t / p_s))
      else:
        kd_tok[i, j] = np.sum(p_s * np.log(p_s / p_t))
      full = s_s * student_logits[i, j]
      ce_tok[i, j] = np.log(np.exp(full - full.max()).sum()) + full.max() - full[labels[i, j]]
  denom = max(mask.sum(), 1.0)
  kd_mean, ce_mean = (kd_tok * mask).sum() / denom, (ce_tok * mask).sum() / denom
  return kd_w * kd_mean + sft_w * ce_mean, kd_mean, ce_mean


def student_label_logprobs(student_logits, labels, scale=1.0):
  return np.take_along_axis(np_log_softmax(scale * student_logits), labels[..., None], -1)[..., 0]


class TestLoss:

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("kind", kd.KINDS)
  @pytest.mark.parametrize("kd_w,sft_w,s_s,s_t", [(1.0, 0.0, 1.0, 1.0), (1.0, 0.4, 1.0, 1.0),
                                                  (0.6, 0.4, 0.5, 2.0), (0.0, 1.0, 1.0, 1.0)])
  def test_matches_numpy(self, seed, kind, kd_w, sft_w, s_s, s_t):
    sl, tt, ids, labels, mask = draw(seed)
    got, metrics = kd.loss(kd.gather_topk(sl, ids), tt, mask,
                           student_target_logprobs=student_label_logprobs(sl, labels, s_s), kind=kind,
                           kd_weight=kd_w, sft_weight=sft_w, logits_scale=s_s, target_logits_scale=s_t)
    assert got.dtype == jnp.float64
    want, kd_mean, ce_mean = np_kd(sl, tt, ids, labels, mask, kind, kd_w, sft_w, s_s, s_t)
    np.testing.assert_allclose(float(got), want, rtol=1e-11)
    np.testing.assert_allclose(float(metrics["kd_loss"]), kd_mean, rtol=1e-11)
    np.testing.assert_allclose(float(metrics["sft_loss"]), ce_mean, rtol=1e-11)

  def test_default_is_bwd_kl_and_kinds_differ(self):
    sl, tt, ids, labels, mask = draw(4)
    st = kd.gather_topk(sl, ids)
    default = float(kd.loss(st, tt, mask)[0])
    assert default == float(kd.loss(st, tt, mask, kind="bwd_kl")[0])
    assert abs(default - float(kd.loss(st, tt, mask, kind="fwd_kl")[0])) > 1e-6

  def test_zero_when_student_matches_teacher_up_to_shift(self):
    _, tt, _, _, mask = draw(6)
    for kind in kd.KINDS:
      got, _ = kd.loss(tt + 3.7, tt, mask, kind=kind)  # softmax is shift invariant per token
      assert abs(float(got)) < 1e-12

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("kind", kd.KINDS)
  def test_gradient_matches_nemo_backward(self, seed, kind):
    sl, tt, ids, _, mask = draw(seed)
    s_s, s_t, kd_w = 0.7, 1.3, 0.8
    st = np.take_along_axis(sl, ids, -1)
    g = np.asarray(jax.grad(lambda x: kd.loss(x, tt, mask, kind=kind, kd_weight=kd_w, logits_scale=s_s,
                                              target_logits_scale=s_t)[0])(st))
    log_ps, log_pt = np_log_softmax(s_s * st), np_log_softmax(s_t * tt)
    p_s, p_t = np.exp(log_ps), np.exp(log_pt)
    if kind == "fwd_kl":
      per = p_s - p_t
    else:
      kl = (p_s * (log_ps - log_pt)).sum(-1, keepdims=True)
      per = p_s * (log_ps - log_pt - kl)
    want = kd_w * s_s * per * mask[..., None] / mask.sum()
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-15)

  def test_masked_padding_is_ignored_without_nan(self):
    sl, tt, ids, labels, mask = draw(9)
    st = kd.gather_topk(sl, ids)
    lp = student_label_logprobs(sl, labels)
    ref, _ = kd.loss(st, tt, mask, student_target_logprobs=lp, sft_weight=0.5)
    pad = mask == 0
    st2 = np.where(pad[..., None], -np.inf, np.asarray(st))
    tt2 = np.where(pad[..., None], -np.inf, tt)
    lp2 = np.where(pad, -np.inf, lp)
    f = lambda x: kd.loss(x, tt2, mask, student_target_logprobs=lp2, sft_weight=0.5)  # noqa: E731
    got, _ = f(st2)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-14)
    g = np.asarray(jax.grad(lambda x: f(x)[0])(st2))
    assert np.all(np.isfinite(g)) and np.all(g[pad] == 0.0)

  def test_loss_mask_clamped_and_empty(self):
    sl, tt, ids, _, mask = draw(1)
    st = kd.gather_topk(sl, ids)
    a = float(kd.loss(st, tt, mask)[0])
    assert float(kd.loss(st, tt, mask * 5.0)[0]) == pytest.approx(a, rel=1e-14)
    assert float(kd.loss(st, tt, np.zeros_like(mask))[0]) == 0.0

  def test_float32(self):
    sl, tt, ids, _, mask = draw(12)
    st = np.take_along_axis(sl, ids, -1)
    got, _ = kd.loss(st.astype(np.float32), tt.astype(np.float32), mask.astype(np.float32), kind="fwd_kl")
    assert got.dtype == jnp.float32
    want, _, _ = np_kd(sl.astype(np.float32).astype(np.float64), tt.astype(np.float32).astype(np.float64), ids,
                       np.zeros(mask.shape, int), mask, "fwd_kl", 1.0, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)

  def test_gather_topk(self):
    sl, _, ids, _, _ = draw(3)
    got = np.asarray(kd.gather_topk(sl, ids))
    b, t, k = ids.shape
    want = np.array([[[sl[i, j, ids[i, j, c]] for c in range(k)] for j in range(t)] for i in range(b)])
    np.testing.assert_array_equal(got, want)

  def test_errors(self):
    st = np.zeros((2, 3, 4))
    mask = np.ones((2, 3))
    with pytest.raises(ValueError, match="both be 0"):
      kd.loss(st, st, mask, kd_weight=0.0, sft_weight=0.0)
    with pytest.raises(ValueError, match="student_target_logprobs"):
      kd.loss(st, st, mask, sft_weight=0.5)
    with pytest.raises(ValueError, match="fwd_kl"):
      kd.loss(st, st, mask, kind="jsd")
    with pytest.raises(ValueError, match="must match"):
      kd.loss(st, st[..., :3], mask)
    with pytest.raises(ValueError, match="loss_mask"):
      kd.loss(st, st, np.ones((2, 4)))
    with pytest.raises(ValueError, match="student_target_logprobs"):
      kd.loss(st, st, mask, student_target_logprobs=np.zeros((2, 4)), sft_weight=1.0)
