"""SteerLM 2.0 through the shared loop: the data (groups of responses with their log-probabilities), the
row layout, and training on the bundled groups."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.losses import steerlm2
from jalign.data import formats, preference
from jalign.data.chat import NemoChatFormat
from jalign.data.tokenizer import Tokenizer
from jalign.models import LlamaConfig, Transformer
from jalign.recipes.build import build_trainer

from tests.conftest import direct_logprobs, load, quiet

GOOD = {"system": "", "prompt_turns": [{"from": "User", "value": "What is one plus one?"}], "label": "correctness:4",
        "responses": [{"value": "One plus one is two.", "log(P(a|x,y))": -0.3, "log(P(y|x))": -9.0,
                       "log(Q(y|a,x))": -8.0},
                      {"value": "One plus one is five.", "log(P(a|x,y))": -5.0, "log(P(y|x))": -9.5,
                       "log(Q(y|a,x))": -7.5}]}


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(prompt_turns=r["prompt_turns"] * 2), "it must have an odd count"),
    (lambda r: r["responses"][1].pop("log(Q(y|a,x))"), "responses[1]: missing field 'log(Q(y|a,x))'"),
    (lambda r: r["responses"][0].update({"log(P(y|x))": "high"}), "responses[0]: field 'log(P(y|x))' must be a finite"),
    (lambda r: r.pop("label"), "missing field 'label'"),
])
def test_bad_records_name_the_line_and_field(tmp_path, change, message):
  bad = json.loads(json.dumps(GOOD))
  change(bad)
  path = _write(tmp_path / "groups.jsonl", [GOOD, bad])
  with pytest.raises(formats.DataError) as error:
    formats.read_jsonl(path, "steerlm2")
  assert "groups.jsonl:2: " in str(error.value) and message in str(error.value)


def test_groups_get_softmax_weights_and_the_label_in_the_prompt(tmp_path):
  tok = Tokenizer.tiny()
  records, _ = formats.read_jsonl(_write(tmp_path / "g.jsonl", [GOOD]), "steerlm2")
  chat = NemoChatFormat.extra_id()
  [group], stats = preference.encode_groups(records, tok, max_length=128, chat_format=chat)
  z = np.array([-0.3 - 9.0 + 8.0, -5.0 - 9.5 + 7.5])
  np.testing.assert_allclose(group.weights, np.exp(z) / np.exp(z).sum(), rtol=1e-6)
  np.testing.assert_allclose(group.q_prime, [-8.0, -7.5])
  prompt, _ = preference.render_prompt([{"role": "user", "content": "What is one plus one?"}], chat,
                                       label="correctness:4")
  assert prompt.endswith("<extra_id_1>Assistant\n<extra_id_2>correctness:4\n")
  assert tok.decode(group.responses[0].tokens.tolist()).endswith("Assistant\ncorrectness:4\nOne plus one is two.\n")
  # Only the response (and the next turn's start) is trained on.
  masked = tok.decode(group.responses[0].tokens[group.responses[0].loss_mask].tolist())
  assert masked.startswith("One plus one is two.") and stats.examples == 1
  # A response too long for the row leaves the group; with one response left the group is dropped.
  long = dict(GOOD, responses=[dict(GOOD["responses"][0], value="two " * 200), GOOD["responses"][1]])
  records, _ = formats.read_jsonl(_write(tmp_path / "l.jsonl", [long]), "steerlm2")
  groups, stats = preference.encode_groups(records, tok, max_length=64, chat_format=chat)
  assert groups == [] and stats.dropped == 1


def test_group_rows_give_each_responses_log_prob(tmp_path):
  tok = Tokenizer.tiny()
  records = [json.loads(line) for line in open(preference.__file__.replace("data/preference.py",
                                                                            "assets/data/steerlm2_val.jsonl"))][:3]
  records, _ = formats.read_jsonl(_write(tmp_path / "g.jsonl", records), "steerlm2")
  groups, _ = preference.encode_groups(records, tok, max_length=80, chat_format=NemoChatFormat.extra_id())
  rows = [preference.group_row([g], 4 * 80, 0, group_size=5) for g in groups] + [preference.group_row([], 320, 0, 5)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  logq, num_tokens = nnx.jit(steerlm2.group_logprobs)(model, batch)
  want = iter(direct_logprobs(model, [ex for g in groups for ex in g.responses]))  # each response alone
  for r, g in enumerate(groups):
    for i, ex in enumerate(g.responses):
      assert float(logq[r, i]) == pytest.approx(next(want), rel=1e-4, abs=1e-3)
      assert float(num_tokens[r, i]) == ex.loss_mask[1:].sum()
    assert float(batch["sample_mask"][r, 4]) == 0.0  # the fifth slot is empty: 4 responses
  # The loss of the batch equals that of the real groups alone: empty slots and padding rows count for nothing.
  loss = nnx.jit(steerlm2.train_loss)
  value, groups_count, _ = loss(model, batch)
  real = {k: v[:-1, :4] if v.ndim == 2 and v.shape[1] == 5 else v[:-1] for k, v in batch.items()}
  alone, alone_count, _ = loss(model, real)
  assert float(groups_count) == 3 == float(alone_count)
  assert float(value) == pytest.approx(float(alone), rel=1e-5, abs=1e-7)


@pytest.mark.many_steps
def test_steerlm2_learns_to_prefer_the_weighted_answer(tmp_path):
  c = load("steerlm2_tiny", tmp_path / "sl2", **{"train.max_steps": 120, "train.val_check_interval": 120,
                                                 "train.micro_batch_size": 2,  # one micro-batch per step
                                                 "train.save_interval": 0, "optimizer.lr": 2e-3,
                                                 "optimizer.min_lr": 2e-4})
  loop = build_trainer(c, log=quiet)
  before = loop.validate()
  summary = loop.run()
  after = summary["val"]
  assert after["val_distance"] < 0.5 * before["val_distance"], (before, after)
  assert after["val_top_weight_accuracy"] > 0.65 > before["val_top_weight_accuracy"], (before, after)
  assert all(np.isfinite(v) for v in loop.losses.values())
  assert jax.device_count() == 8
