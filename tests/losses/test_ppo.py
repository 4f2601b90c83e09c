"""PPO and RLOO against float64 numpy loops written from NeMo-Aligner §2.8 and §2.9."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import ppo, rloo

pytestmark = pytest.mark.usefixtures("x64")
SEEDS = [0, 3, 17, 64]


def draw_rows(rng, b=5, width=12):
  prompt = rng.integers(1, 5, b)
  lengths = np.minimum(prompt + rng.integers(1, 8, b), width)
  lengths[0] = width  # a row that fills the width
  mask = np.zeros((b, width))
  for i in range(b):
    mask[i, prompt[i] - 1:lengths[i] - 1] = 1.0
  return prompt, lengths, mask


def np_gae(rewards, values, mask, gamma, lam):
  r, v = rewards * mask, values * mask
  b, t = r.shape
  adv = np.zeros((b, t))
  for i in range(b):
    last = 0.0
    for j in reversed(range(t)):
      nxt = v[i, j + 1] if j + 1 < t else 0.0
      last = r[i, j] + gamma * nxt - v[i, j] + gamma * lam * last
      adv[i, j] = last
  return adv, adv + v


@pytest.mark.parametrize("seed", SEEDS)
def test_response_mask_covers_prompt_end_to_before_the_last_token(seed):
  rng = np.random.default_rng(seed)
  prompt, lengths, mask = draw_rows(rng)
  np.testing.assert_array_equal(ppo.response_mask(prompt, lengths, mask.shape[1]), mask)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("absolute", [True, False])
def test_rewards_with_kl(seed, absolute):
  rng = np.random.default_rng(seed)
  prompt, lengths, mask = draw_rows(rng)
  old, init = rng.normal(-2, 1, mask.shape), rng.normal(-2, 1, mask.shape)
  scores = rng.normal(0, 3, len(prompt))
  rewards, kl = ppo.rewards_with_kl(scores, old, init, mask, kl_coef=0.05, absolute_kl=absolute)
  k = (old - init) * mask
  k = np.abs(k) if absolute else k
  want = -0.05 * k
  for i in range(len(prompt)):
    want[i, max(lengths[i] - 2, 0)] += scores[i]  # NeMo: the score at index L-2
  np.testing.assert_allclose(rewards, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(kl, k, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_the_backward_loop(seed, gamma, lam):
  rng = np.random.default_rng(seed)
  _, _, mask = draw_rows(rng)
  rewards, values = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
  adv, ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=lam)
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go():
  rewards = np.array([[0.0, 1.0, 2.0, 3.0, 9.0]])
  mask = np.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
  adv, ret = ppo.gae(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(ret[0, 1:4], [6.0, 5.0, 3.0])  # the masked-out 9 never counts


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten(seed):
  rng = np.random.default_rng(seed)
  _, _, mask = draw_rows(rng)
  x = rng.normal(3, 2, mask.shape)
  sel = x[mask > 0]
  want = (x - sel.mean()) / np.sqrt(sel.var() + 1e-8)
  out = np.asarray(ppo.whiten(x, mask))
  np.testing.assert_allclose(out, want, rtol=1e-10)
  assert abs(out[mask > 0].mean()) < 1e-10 and abs(out[mask > 0].std() - 1) < 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_actor_loss(seed, entropy_coef):
  rng = np.random.default_rng(seed)
  _, _, mask = draw_rows(rng)
  old = rng.normal(-2, 1, mask.shape)
  new = old + rng.normal(0, 0.4, mask.shape)  # ratios on both sides of the clip range
  adv = rng.normal(size=mask.shape)
  entropy = rng.uniform(0, 5, mask.shape)
  loss, metrics = ppo.actor_loss(new, old, adv, mask, clip_eps=0.2, entropy=entropy, entropy_coef=entropy_coef)
  num = den = ent = clipped = 0.0
  for i, j in zip(*np.nonzero(mask)):
    r = np.exp(new[i, j] - old[i, j])
    num += max(-adv[i, j] * r, -adv[i, j] * min(max(r, 0.8), 1.2))
    ent += entropy[i, j]
    clipped += abs(r - 1) > 0.2
    den += 1
  np.testing.assert_allclose(loss, num / den - entropy_coef * ent / den, rtol=1e-12)
  np.testing.assert_allclose(metrics["clip_fraction"], clipped / den, rtol=1e-12)
  assert 0 < metrics["clip_fraction"] < 1


def test_actor_loss_gradient_stops_outside_the_clip_range():
  # Positive advantage and a ratio above 1 + eps: the clipped term wins, so no gradient.
  g = jax.grad(lambda lp: ppo.actor_loss(lp, jnp.zeros(3), jnp.ones(3), jnp.ones(3))[0])
  np.testing.assert_allclose(g(jnp.array([0.5, 0.0, -0.5])), [0.0, -1 / 3, -np.exp(-0.5) / 3], rtol=1e-12)


def test_actor_loss_with_no_tokens_is_zero():
  loss, _ = ppo.actor_loss(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 3)))
  assert loss == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [0.2, 0.0])
def test_critic_loss(seed, clip):
  rng = np.random.default_rng(seed)
  _, _, mask = draw_rows(rng)
  old, returns = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
  values = old + rng.normal(0, 0.5, mask.shape)
  loss, _ = ppo.critic_loss(values, old, returns, mask, clip=clip)
  terms = []
  for i, j in zip(*np.nonzero(mask)):
    err = (values[i, j] - returns[i, j]) ** 2
    if clip > 0:
      vc = old[i, j] + min(max(values[i, j] - old[i, j], -clip), clip)
      err = max(err, (vc - returns[i, j]) ** 2)
    terms.append(err)
  np.testing.assert_allclose(loss, 0.5 * np.mean(terms), rtol=1e-12)


def np_rloo(rewards, groups, ended):
  out = np.empty_like(rewards)
  for i in range(len(rewards)):
    members = [j for j in range(len(rewards)) if groups[j] == groups[i]]
    n = sum(ended[j] for j in members)
    if n <= 1:
      out[i] = rewards[i]
    else:
      out[i] = sum(rewards[j] for j in members if j != i and ended[j]) / (n - 1)
  return out


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_baseline(seed):
  rng = np.random.default_rng(seed)
  groups = np.repeat(np.arange(4), 4)
  rng.shuffle(groups)
  ended = rng.random(16) < 0.7
  ended[groups == 0] = False  # a group without ended samples
  ended[np.flatnonzero(groups == 1)[1:]] = False  # one with a single ended sample
  rewards = rng.normal(size=16)
  out = rloo.baseline(rewards, groups, ended)
  np.testing.assert_allclose(out, np_rloo(rewards, groups, ended), rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(out)[groups <= 1], rewards[groups <= 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_loss_and_sequence_kl(seed):
  rng = np.random.default_rng(seed)
  _, _, mask = draw_rows(rng)
  lp, init = rng.normal(-2, 1, mask.shape), rng.normal(-2, 1, mask.shape)
  kl = rloo.sequence_kl(lp, init, mask)
  want_kl = [np.abs(lp[i] - init[i])[mask[i] > 0].mean() for i in range(len(mask))]
  np.testing.assert_allclose(kl, want_kl, rtol=1e-12)
  rewards, base = rng.normal(size=len(mask)), rng.normal(size=len(mask))
  value, _ = rloo.loss(lp, rewards, base, mask)
  want = sum(-lp[i, j] * (rewards[i] - base[i]) for i, j in zip(*np.nonzero(mask))) / mask.sum()
  np.testing.assert_allclose(value, want, rtol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_reinforce_train_loss_is_the_masked_mean_over_the_model_log_probs(weighted):
  from flax import nnx

  from jalign.models import LlamaConfig, Transformer
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.config.vocab_size, (3, 10)).astype(np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "positions": np.tile(np.arange(10), (3, 1)),
           "segment_ids": np.ones((3, 10), np.int32), "loss_mask": (rng.random((3, 10)) < 0.6).astype(np.float32),
           "advantages": rng.normal(size=3).astype(np.float32)}
  weights = np.ones((3, 10))
  if weighted:  # truncated importance weights (rollout.tis_cap) scale each token's term
    batch["tis_weights"] = weights = rng.uniform(0.2, 2.0, (3, 10)).astype(np.float32)
  total, count, metrics = rloo.train_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)), axis=-1), np.float64)
  lp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  want = -(lp * batch["advantages"][:, None] * batch["loss_mask"] * weights).sum()
  np.testing.assert_allclose(total, want, rtol=2e-5)
  assert count == batch["loss_mask"].sum()
  np.testing.assert_allclose(metrics["response_logprob"], (lp * batch["loss_mask"]).sum(), rtol=2e-5)
  if weighted:
    np.testing.assert_allclose(metrics["tis_weight"], (weights * batch["loss_mask"]).sum(), rtol=1e-6)
