"""Reward models through the shared loop: Bradley-Terry on the bundled pairs (right vs wrong facts) and
regression (SteerLM) on the bundled attribute scores."""

import json

import jax
import numpy as np
import pytest

from jalign.config import data_path
from jalign.data import formats
from jalign.train import run

from tests.conftest import CPU_XLA_FLAGS, load, quiet

pytestmark = pytest.mark.many_steps


def test_reward_model_learns_the_facts(facts_reward_run):
  rows = [json.loads(line) for line in (facts_reward_run / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  [val] = [r for r in rows if r["split"] == "val"]
  assert val["step"] == 250 and val["val_accuracy"] > 0.75, val
  assert val["val_rewards_chosen_mean"] > val["val_rewards_rejected_mean"]
  assert losses[250] < 0.6 * losses[1]


def mean_predictor_mse(path, mask_value=-100.0):
  """The squared error of predicting each attribute's mean: what a model that learned nothing scores."""
  labels = np.array([json.loads(line)["label"] for line in open(path)], np.float64)
  errors = [((col[col != mask_value] - col[col != mask_value].mean()) ** 2) for col in labels.T]
  return float(sum(e.sum() for e in errors) / sum(len(e) for e in errors))


def test_regression_reward_model_beats_the_mean_predictor(tmp_path):
  c = load("rm_regression_tiny", tmp_path / "reg", **{"train.max_steps": 250, "train.val_check_interval": 250,
                                                      "train.save_interval": 0})
  summary = run(c, log=quiet)
  baseline = mean_predictor_mse(data_path(c.data.validation))
  assert summary["val"]["val_loss"] < 0.75 * baseline, (summary["val"], baseline)
  assert summary["losses"][1] > 3 * baseline  # it starts from a head that predicts about 0


def test_regression_labels_of_the_wrong_size_name_the_file_and_key(tmp_path):
  c = load("rm_regression_tiny", tmp_path / "bad", **{"rm.num_attributes": 3, "train.max_steps": 1})
  with pytest.raises(formats.DataError, match=r"regression_train.jsonl: record 0: label has 2 attributes, "
                                              r"expected 3 \(config.rm.num_attributes\)"):
    run(c, log=quiet)


def test_steerlm_annotates_every_assistant_turn_and_sft_trains_on_the_labels(tmp_path):
  import subprocess
  import sys

  from jalign.data.chat import NemoChatFormat
  from jalign.data.sft import encode_records
  from jalign.data.tokenizer import Tokenizer

  rm_run = tmp_path / "rm"
  run(load("rm_regression_tiny", rm_run, **{"train.max_steps": 20, "train.val_check_interval": 0,
                                            "train.save_interval": 0}), log=quiet)
  source = data_path("bundled:sft_chat_val.jsonl")
  out = tmp_path / "labelled.jsonl"
  done = subprocess.run([sys.executable, "-m", "jalign.steerlm", f"--rm={rm_run}", f"--input={source}",
                         f"--output={out}", "--attributes=correctness,verbosity"], capture_output=True, text=True,
                        timeout=600, env={**__import__("os").environ, "XLA_FLAGS": CPU_XLA_FLAGS})
  assert done.returncode == 0, done.stderr[-2000:]
  originals = [json.loads(line) for line in open(source)]
  labelled = [json.loads(line) for line in open(out)]
  assert len(labelled) == len(originals) == 64
  import re
  for before, after in zip(originals, labelled):
    assert after["type"] == "VALUE_TO_TEXT"
    for t0, t1 in zip(before["conversations"], after["conversations"]):
      assert t0["value"] == t1["value"]
      if t1["from"] == "Assistant":
        assert re.fullmatch(r"correctness:[0-4],verbosity:[0-4]", t1["label"]), t1["label"]
  # Attribute-conditioned SFT: the label is in the prompt, which the loss does not cover.
  examples, _ = encode_records(labelled[:4], "chat", Tokenizer.tiny(), max_length=256,
                               chat_format=NemoChatFormat.extra_id())
  text = Tokenizer.tiny().decode(examples[0].tokens[~examples[0].loss_mask], skip_special_tokens=False)
  assert "<extra_id_2>correctness:" in text
  sft = load("sft_tiny", tmp_path / "sft", **{"data.train": str(out), "data.validation": "",
                                              "data.chat_prompt_tokens": "extra_id", "train.max_steps": 2,
                                              "train.val_check_interval": 0, "train.save_interval": 0})
  assert run(sft, log=quiet)["steps"] == 2


def test_steerlm_refuses_a_folder_without_a_run(tmp_path):
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "jalign.steerlm", f"--rm={tmp_path}", "--input=x.jsonl",
                         f"--output={tmp_path / 'o.jsonl'}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and f"{tmp_path / 'config.json'}: not a jalign run folder" in done.stderr


def test_lora_reward_model_trains_the_adapters_and_the_new_head(tmp_path):
  from jalign import trainer
  from jalign.recipes.build import build_trainer
  c = load("rm_tiny", tmp_path / "lora_rm", **{"lora.rank": 8, "train.max_steps": 1, "train.save_interval": 0,
                                               "train.val_check_interval": 0})
  loop = build_trainer(c, log=quiet)
  names = {"/".join(str(p) for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(loop.state.params)[0]}
  assert any("head" in n for n in names) and any("lora" in n for n in names)
  assert all("lora" in n or "head" in n for n in names), sorted(names)
  assert trainer.count(loop.state.params) < 0.05 * (trainer.count(loop.state.params) + trainer.count(loop.state.rest))
