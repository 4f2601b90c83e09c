"""Generation: greedy output against transformers' generate, stop handling, sampling log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jalign.models import hf
from jalign.rollout import filter_logits, generate
from tests.models.hf_fixtures import save_random

PROMPTS = [[5, 17, 99, 3], [42], [7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen") / "llama"
  ref = save_random("llama", path, seed=3)
  return hf.load(path), ref


def test_greedy_equals_transformers_generate(pair):
  model, ref = pair
  rollout = generate(model, PROMPTS, max_new_tokens=12, greedy=True)
  for b, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    expected = out[0].tolist()
    n = int(rollout.lengths[b])
    assert rollout.tokens[b, :n].tolist() == expected
    assert int(rollout.prompt_lengths[b]) == len(prompt) and n == len(prompt) + 12


def test_stop_ids_pad_and_min_new_tokens(pair):
  model, _ = pair
  free = generate(model, PROMPTS, max_new_tokens=10, greedy=True)
  first = [int(free.tokens[b, len(p)]) for b, p in enumerate(PROMPTS)]
  stopped = generate(model, PROMPTS, max_new_tokens=10, greedy=True, stop_ids=(first[0],), pad_id=1)
  n0 = len(PROMPTS[0])
  assert bool(stopped.is_end[0]) and int(stopped.lengths[0]) == n0 + 1  # the stop token is included
  assert (np.asarray(stopped.tokens[0, n0 + 1:]) == 1).all() and (np.asarray(stopped.logprobs[0, n0 + 1:]) == 0).all()
  suppressed = generate(model, PROMPTS, max_new_tokens=10, min_new_tokens=4, greedy=True, stop_ids=(first[0],))
  assert int(suppressed.tokens[0, n0]) != first[0]
  assert int(suppressed.lengths[0]) >= n0 + 4
  assert not bool(free.is_end.any())


def test_sampling_log_probs_and_top_k_one(pair):
  model, _ = pair
  greedy = generate(model, PROMPTS, max_new_tokens=6, greedy=True)
  top1 = generate(model, PROMPTS, max_new_tokens=6, top_k=1, seed=5)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  # Under top-k=1 the sampling distribution is a point mass: every sampling log-prob is 0.
  assert np.allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)
  assert not np.allclose(np.asarray(greedy.logprobs), 0.0, atol=1e-3)
  sampled = generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, seed=1)
  # Log-probs recomputed from a full forward pass at the same temperature equal the sampling ones.
  logits = model(sampled.tokens) / 0.7
  logp = jax.nn.log_softmax(logits[:, :-1])
  picked = jnp.take_along_axis(logp, sampled.tokens[:, 1:, None], -1)[..., 0]
  for b, p in enumerate(PROMPTS):
    n = int(sampled.lengths[b])
    np.testing.assert_allclose(sampled.logprobs[b, len(p):n], picked[b, len(p) - 1:n - 1], atol=1e-4)
    assert (np.asarray(sampled.logprobs[b, :len(p)]) == 0).all()


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: (np.asarray(x) > -1e29).tolist()[0]
  assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
  assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
  assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]


def test_bad_arguments_are_refused(pair):
  model, _ = pair
  with pytest.raises(ValueError, match="non-empty"):
    generate(model, [[1], []], max_new_tokens=3)
  with pytest.raises(ValueError, match="min_new_tokens"):
    generate(model, [[1]], max_new_tokens=3, min_new_tokens=4)


def test_rows_split_over_devices_generate_what_one_device_does(pair):
  model, _ = pair
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  prompts = [PROMPTS[i % 3][: 1 + i % 4] for i in range(16)]
  for kwargs in (dict(greedy=True), dict(temperature=0.8, top_p=0.9, seed=4)):
    whole = generate(model, prompts, max_new_tokens=5, **kwargs)
    split = generate(model, prompts, max_new_tokens=5, batch_sharding=rows, **kwargs)
    assert split.tokens.sharding.spec[0] == "data"  # each device decoded its own two rows
    np.testing.assert_array_equal(split.tokens, whole.tokens)
    np.testing.assert_allclose(split.logprobs, whole.logprobs, atol=1e-5)


def test_a_prompts_sample_depends_on_its_id_not_its_row(pair):
  model, _ = pair
  prompts = [PROMPTS[i % 3][: 1 + i % 4] for i in range(6)]
  whole = generate(model, prompts, max_new_tokens=5, temperature=0.9, seed=2)
  order = [4, 1, 5, 0, 3, 2]
  shuffled = generate(model, [prompts[i] for i in order], max_new_tokens=5, temperature=0.9, seed=2,
                      prompt_ids=order)
  for row, i in enumerate(order):
    assert shuffled.tokens[row].tolist() == whole.tokens[i].tolist()
  assert len({tuple(whole.tokens[i, len(prompts[i]):].tolist()) for i in (0, 3)}) == 2  # same prompt, own key


def test_continuous_batching_gives_each_prompt_the_static_batchs_tokens(pair):
  model, _ = pair
  prompts = [PROMPTS[i % 3][: 1 + i % 5] + [20 + i] for i in range(7)]
  limits = [3, 9, 1, 6, 12, 2, 8]  # replies of mixed lengths: slots free up at different steps
  free = generate(model, prompts, max_new_tokens=limits, greedy=True)
  assert [int(n) - len(p) for n, p in zip(free.lengths, prompts)] == limits
  stop = int(free.tokens[4, len(prompts[4]) + 2])  # a token some replies stop at
  for kwargs in (dict(greedy=True, stop_ids=(stop,)), dict(temperature=0.8, top_p=0.9, seed=4, min_new_tokens=1)):
    static = generate(model, prompts, max_new_tokens=limits, **kwargs)
    if "stop_ids" in kwargs:
      assert bool(static.is_end[4]) and not bool(static.is_end.all())
    for slots, prefill_rows in ((3, 1), (2, 2)):
      flowing = generate(model, prompts, max_new_tokens=limits, slots=slots, prefill_rows=prefill_rows, **kwargs)
      np.testing.assert_array_equal(flowing.tokens, static.tokens)
      np.testing.assert_array_equal(flowing.lengths, static.lengths)
      np.testing.assert_array_equal(flowing.is_end, static.is_end)
      np.testing.assert_allclose(flowing.logprobs, static.logprobs, atol=1e-5)
      np.testing.assert_allclose(flowing.policy_logprobs, static.policy_logprobs, atol=1e-5)
