"""SPIN: each iteration pairs the chat data's replies with the starting model's own, and trains DPO
against that starting model; iterations chain, and a rerun skips what is finished."""

import json
import math

import pytest

from jalign import config as config_lib
from jalign.recipes import spin
from jalign.data import formats
from jalign.rollout.generate import generate
from jalign.recipes.build import build_model, build_tokenizer, load_trained
from jalign.specs.base import message_format
from jalign.train import run
from tests.conftest import load, quiet


def small_data(tmp_path):
  """The first 16 bundled chat records for training and 8 for validation."""
  out = []
  for name, n in (("sft_chat_train", 16), ("sft_chat_val", 8)):
    lines = config_lib.data_path(f"bundled:{name}.jsonl").read_text().splitlines()[:n]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out.append(str(path))
  return out


def spin_config(tmp_path, **overrides):
  train, val = small_data(tmp_path)
  return load("spin_tiny", tmp_path / "spin", **{
      "data.train": train, "data.validation": val, "data.max_seq_length": 64, "spin.iterations": 2,
      "spin.epochs": 2, "rollout.max_new_tokens": 8, "spin.greedy": True, "rollout.micro_batch_size": 8,
      "train.val_check_interval": 2, "train.save_interval": 2, **overrides})


def greedy_replies(model, tok, c, path):
  """What ``model`` answers (greedily) to the prompts of a pairs file, by an independent call."""
  records, _ = formats.read_jsonl(path, "comparison")
  chat = message_format(c)
  from jalign.data.preference import render_prompt
  ids = [tok.encode(render_prompt(r["prompt"], chat)[0], add_special_tokens=False)[-(64 - 8):] for r in records]
  rollout = generate(model, ids, max_new_tokens=8, greedy=True, stop_ids=(tok.encode(chat.turn_start, add_special_tokens=False)[0],
                     tok.eos_id), pad_id=tok.pad_id)
  out = []
  for reply, ended in zip(rollout.responses(), rollout.is_end.tolist()):
    text = tok.decode(reply[:-1] if ended else reply)
    out.append(text[:-len(chat.end_of_turn)] if text.endswith(chat.end_of_turn) else text)
  return [r["rejected_response"] for r in records], [r["chosen_response"] for r in records], out


def test_iterations_pair_the_data_with_the_starting_models_replies_and_chain(tmp_path):
  c = spin_config(tmp_path)
  summary = run(c, log=quiet)
  iterations = summary["iterations"]
  assert [it["iteration"] for it in iterations] == [1, 2] and summary["stopped"] == "finished"
  root = tmp_path / "spin"

  # Iteration 1 answers with the config's model, iteration 2 with iteration 1's result.
  starts = [build_model(c), None]
  starts[0] = (starts[0][0], build_tokenizer(c, starts[0][1]))
  starts[1] = load_trained(root / "iteration_1")[:2]
  data = [json.loads(line) for line in open(c.data.train)]
  recorded = [next(t["value"] for t in reversed(r["conversations"]) if t["from"] == "Assistant") for r in data]
  for k, (model, tok) in enumerate(starts, 1):
    rejected, chosen, expected = greedy_replies(model, tok, c, root / f"iteration_{k}" / "train_pairs.jsonl")
    assert chosen == [r for r, e in zip(recorded, expected) if e.strip()]
    assert rejected == [e for e in expected if e.strip()]
    assert len(rejected) == iterations[k - 1]["pairs"]["train"]["pairs"]

  for it in iterations:
    # The reference is the model the iteration starts from: DPO's first loss is log 2 in both.
    assert it["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert it["val"]["val_loss"] < math.log(2) and it["val"]["val_accuracy"] > 0.5, it["val"]
    assert it["steps"] == math.ceil(2 * it["pairs"]["train"]["pairs"] / 16)
    saved = config_lib.read_saved(root / f"iteration_{it['iteration']}" / "config.json")
    assert saved.algorithm == "dpo" and saved.data.format == "comparison"
  assert config_lib.read_saved(root / "iteration_2" / "config.json").model.init == f"run:{root / 'iteration_1'}"
  assert json.loads((root / "spin.json").read_text())["iterations"] == json.loads(json.dumps(iterations))


def test_a_rerun_skips_finished_iterations_and_adds_more(tmp_path):
  run(spin_config(tmp_path, **{"spin.iterations": 1}), log=quiet)
  pairs = tmp_path / "spin" / "iteration_1" / "train_pairs.jsonl"
  before = pairs.stat().st_mtime_ns
  summary = run(spin_config(tmp_path, **{"spin.iterations": 2}), log=quiet)
  assert pairs.stat().st_mtime_ns == before  # not generated again
  assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
  assert summary["steps"] == summary["iterations"][1]["steps"]  # only iteration 2 trained now
  # Iteration 2 started from iteration 1's saved result, loaded from its folder.
  c = spin_config(tmp_path)
  model, tok, _ = load_trained(tmp_path / "spin" / "iteration_1")
  rejected, _, expected = greedy_replies(model, tok, c, tmp_path / "spin" / "iteration_2" / "train_pairs.jsonl")
  assert rejected == [e for e in expected if e.strip()]
  assert summary["iterations"][1]["first_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_prompts_are_the_turns_before_the_last_reply():
  records = [{"system": "S", "conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"},
                                                {"from": "User", "value": "c"}, {"from": "Assistant", "value": "d"}]},
             {"system": "", "conversations": [{"from": "Assistant", "value": "alone"}]},
             {"system": "", "conversations": [{"from": "User", "value": "no reply"}]}]
  prompts, replies, skipped = spin.prompts_and_replies(records)
  assert prompts == [[{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
  assert replies == ["d"] and skipped == 2


def test_spin_reads_chat_data_only(tmp_path):
  c = spin_config(tmp_path, **{"data.format": "comparison"})
  with pytest.raises(config_lib.ConfigError, match="config.data.format"):
    run(c, log=quiet)
