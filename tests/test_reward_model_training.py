"""Reward models through the shared loop: Bradley-Terry on the bundled pairs (right vs wrong facts) and
regression (SteerLM) on the bundled attribute scores."""

import json

import numpy as np
import pytest

from jalign.config import data_path
from jalign.data import formats
from jalign.train import run

from tests.test_preference_training import load, quiet


def test_reward_model_learns_the_facts(tmp_path):
  c = load("rm_tiny", tmp_path / "rm", **{"train.max_steps": 250, "train.val_check_interval": 250,
                                          "train.save_interval": 0})
  summary = run(c, log=quiet)
  val = summary["val"]
  assert val["val_accuracy"] > 0.75, val
  assert val["val_rewards_chosen_mean"] > val["val_rewards_rejected_mean"]
  assert summary["losses"][250] < 0.6 * summary["losses"][1]


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
