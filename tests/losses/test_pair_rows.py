"""Per-pair log-probs and rewards from rows of pairs: packed rows give what one pair per row gives, and
both equal a direct per-sequence computation from the model's full logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.losses import dpo, rm
from jalign.data import formats, preference
from jalign.config import data_path
from jalign.data.tokenizer import Tokenizer
from jalign.models import LlamaConfig, Transformer
from jalign.models.heads import ValueModel
from tests.conftest import direct_logprobs

TOK = Tokenizer.tiny()
CFG = LlamaConfig.preset("tiny")


def _pairs(n=5):
  records, _ = formats.read_jsonl(data_path("bundled:pref_val.jsonl"), "comparison")
  pairs, _ = preference.encode_pairs(records[:n], TOK, max_length=80)
  return pairs


def _rows(pairs, plan, length, max_pairs):
  rows = [preference.pairs_row([pairs[i] for i in r], length, 0, max_pairs) for r in plan]
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *rows), [i for r in plan for i in r]


def _slots(values, plan, max_pairs):
  """Per-pair values in pair order from ``[rows * max_pairs]`` slot values."""
  out = {}
  for r, items in enumerate(plan):
    for k, i in enumerate(items):
      out[i] = float(values[r * max_pairs + k])
  return np.array([out[i] for i in sorted(out)])


def direct_pair_logprobs(model, pairs) -> np.ndarray:
  """``[pairs, 2]``: the chosen and rejected responses' log-probs computed as separate sequences."""
  return direct_logprobs(model, [ex for p in pairs for ex in (p.chosen, p.rejected)]).reshape(-1, 2)


def test_packed_and_unpacked_rows_give_each_pairs_log_probs():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  pairs = _pairs()
  unpacked_plan = preference.plan_item_rows(pairs, 160, pack=False)
  packed_plan = preference.plan_item_rows(pairs, 256, pack=True)
  assert max(len(r) for r in packed_plan) > 1
  results = []
  for plan, max_pairs, length in ((unpacked_plan, 1, 160), (packed_plan, max(len(r) for r in packed_plan), 256)):
    batch, _ = _rows(pairs, plan, length, max_pairs)
    chosen, rejected = dpo.pair_logprobs(model, batch)
    results.append((_slots(chosen, plan, max_pairs), _slots(rejected, plan, max_pairs)))
    mask = np.asarray(batch["pair_mask"]).reshape(-1)
    assert mask.sum() == len(pairs)
    assert np.all(np.asarray(chosen)[mask == 0] == 0)
  direct = direct_pair_logprobs(model, pairs)
  for chosen, rejected in results:
    np.testing.assert_allclose(chosen, direct[:, 0], rtol=1e-5)
    np.testing.assert_allclose(rejected, direct[:, 1], rtol=1e-5)


def test_shared_prompt_rows_give_each_pairs_log_probs():
  """The prompt once, the two responses as branches that see it and themselves only: the same per-pair
  log-probs as separate sequences, in fewer tokens, and their gradients too."""
  model = Transformer(CFG, rngs=nnx.Rngs(3))
  pairs = _pairs(6)
  plan = preference.plan_item_rows(pairs, 200, pack=True, size=preference.shared_pair_length)
  max_pairs = max(len(r) for r in plan)
  assert max_pairs > 1
  rows = [preference.shared_pairs_row([pairs[i] for i in r], 200, 0, max_pairs) for r in plan]
  batch = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *rows)
  shared_tokens = int(np.sum(np.asarray(batch["segment_ids"]) > 0))
  assert shared_tokens == sum(preference.shared_pair_length(p) for p in pairs) < 0.8 * sum(len(p) for p in pairs)
  chosen, rejected = dpo.pair_logprobs(model, batch)
  direct = direct_pair_logprobs(model, pairs)
  np.testing.assert_allclose(_slots(chosen, plan, max_pairs), direct[:, 0], rtol=1e-5)
  np.testing.assert_allclose(_slots(rejected, plan, max_pairs), direct[:, 1], rtol=1e-5)
  # Gradients of the summed log-probs equal those from one pair per row, unshared.
  unshared, _ = _rows(pairs, [[i] for i in range(len(pairs))], 160, 1)
  graphdef, state = nnx.split(model)
  objective = lambda st, b: sum(jnp.sum(x) for x in dpo.pair_logprobs(nnx.merge(graphdef, st), b))
  g_shared = jax.grad(objective)(state, batch)
  g_plain = jax.grad(objective)(state, unshared)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_averaged_log_probs_divide_by_the_response_length():
  model = Transformer(CFG, rngs=nnx.Rngs(1))
  pairs = _pairs(3)
  batch, _ = _rows(pairs, [[0], [1], [2]], 160, 1)
  summed, _ = dpo.pair_logprobs(model, batch)
  averaged, _ = dpo.pair_logprobs(model, batch, average=True)
  lengths = np.array([p.chosen.loss_mask[1:].sum() for p in pairs])
  np.testing.assert_allclose(averaged, np.asarray(summed) / lengths, rtol=1e-6)


def test_orpo_trains_on_each_pairs_averaged_log_probs_and_ignores_empty_slots():
  """``train_loss(loss_type="orpo")`` on packed rows with empty slots: ORPO written out in numpy (TRL's
  log-odds, the chosen responses' per-token NLL averaged over pairs) on each pair's own log-probs, and
  finite gradients although an empty slot's average log-prob is 0."""
  model = Transformer(CFG, rngs=nnx.Rngs(4))
  pairs = _pairs(5)
  plan = preference.plan_item_rows(pairs, 256, pack=True)
  max_pairs = max(len(r) for r in plan)
  batch, _ = _rows(pairs, plan, 256, max_pairs)
  assert np.asarray(batch["pair_mask"]).sum() < batch["pair_mask"].size  # some slots are empty
  lam = 0.3
  total, count, sums = dpo.train_loss(model, batch, loss_type="orpo", beta=lam)
  avg = direct_pair_logprobs(model, pairs) / np.array([[p.chosen.loss_mask[1:].sum(), p.rejected.loss_mask[1:].sum()]
                                                      for p in pairs])
  log_odds = lambda x: x - np.log1p(-np.exp(x))  # noqa: E731
  ratio = log_odds(avg[:, 0]) - log_odds(avg[:, 1])
  want = np.mean(-avg[:, 0]) + lam * np.mean(np.log1p(np.exp(-ratio)))
  assert float(count) == len(pairs)
  np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-5)
  np.testing.assert_allclose(float(sums["accuracy"]) / float(count), np.mean(ratio > 0), atol=1e-6)
  graphdef, state = nnx.split(model)
  grads = jax.grad(lambda st: dpo.train_loss(nnx.merge(graphdef, st), batch, loss_type="orpo")[0])(state)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_rewards_are_read_at_each_responses_last_token():
  model = ValueModel(CFG, rngs=nnx.Rngs(2))
  pairs = _pairs()
  plan = preference.plan_item_rows(pairs, 256, pack=True)
  max_pairs = max(len(r) for r in plan)
  assert max_pairs > 1
  batch, _ = _rows(pairs, plan, 256, max_pairs)
  chosen, rejected = rm.pair_rewards(model, batch)
  # Each response alone, right-padded to one width in one call: its value at its last token.
  examples = [ex for p in pairs for ex in (p.chosen, p.rejected)]
  tokens = np.zeros((len(examples), max(len(ex) for ex in examples)), np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex)] = ex.tokens
  values = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
  direct = np.array([values[i, len(ex) - 1, 0] for i, ex in enumerate(examples)]).reshape(-1, 2)
  np.testing.assert_allclose(_slots(chosen, plan, max_pairs), direct[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_slots(rejected, plan, max_pairs), direct[:, 1], rtol=1e-5, atol=1e-6)
