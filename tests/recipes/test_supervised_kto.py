"""KTO through the shared loop: unpaired feedback, each sample with a mismatched KL sample in its row."""

import json
import random

import pytest

from jalign.recipes.build import build_trainer

from tests.conftest import load, quiet

pytestmark = pytest.mark.many_steps


def feedback_file(path, n, seed):
  """Answers in a desirable style or an undesirable one, for prompts of one template."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      good = rng.random() < 0.5
      f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {rng.randrange(9)} plus one?"}],
                          "response": "Yes, good." if good else "No, bad.",
                          "preference": "chosen" if good else "rejected"}) + "\n")
  return str(path)


def test_kto_starts_at_one_half_and_separates_desirable_from_undesirable(tmp_path):
  c = load("kto_tiny", tmp_path / "kto", **{"data.train": feedback_file(tmp_path / "train.jsonl", 256, 0),
                                            "data.validation": feedback_file(tmp_path / "val.jsonl", 32, 1),
                                            "train.max_steps": 60, "train.val_check_interval": 60,
                                            "train.save_interval": 0})
  loop = build_trainer(c, log=quiet)
  before = loop.validate()
  # rho = 0 and z_ref = 0 at step 0: every sample's loss is 1 - sigmoid(0).
  assert before["val_loss"] == pytest.approx(0.5, abs=1e-6)
  after = loop.run()["val"]
  assert after["val_loss"] < 0.1, after
  assert after["val_rewards_chosen_mean"] > 1.0 > -1.0 > after["val_rewards_rejected_mean"], after


def test_bundled_kto_data_trains(tmp_path):
  c = load("kto_tiny", tmp_path / "bundled", **{"train.max_steps": 3, "train.val_check_interval": 0,
                                                "train.save_interval": 0})
  loop = build_trainer(c, log=quiet)
  loop.run()
  assert loop.losses[1] == pytest.approx(0.5, abs=1e-6) and all(0 < v < 1 for v in loop.losses.values())
