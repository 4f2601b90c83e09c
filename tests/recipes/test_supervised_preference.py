"""DPO training through the shared loop on the bundled preference pairs, whose chosen answer is the right
fact and whose rejected answer a wrong one: learning shows as accuracy well above 50%."""

import ast
import json
import math

import numpy as np
import pytest

from jalign import config as config_lib
from jalign import trainer
from jalign.recipes.build import build_trainer
from jalign.train import run

from jalign.plan import plan
from tests.conftest import load, quiet

pytestmark = pytest.mark.many_steps


def test_dpo_starts_at_log2_and_raises_margin_and_accuracy(tmp_path):
  c = load("dpo_tiny", tmp_path / "dpo", **{"train.max_steps": 100, "train.val_check_interval": 100,
                                            "train.save_interval": 0, "optimizer.lr": 2e-3, "optimizer.min_lr": 2e-4})
  loop = build_trainer(c, log=quiet)
  before = loop.validate()
  # The reference pass and the policy run the same function of the same weights at step 0.
  assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert before["val_reward_margin_mean"] == pytest.approx(0.0, abs=1e-6)
  summary = loop.run()
  assert loop.losses[1] == pytest.approx(math.log(2), abs=1e-6)
  after = summary["val"]
  assert after["val_reward_margin_mean"] > 0.5, after
  assert after["val_accuracy"] > 0.75, after
  assert after["val_loss"] < 0.5


def test_reference_offloaded_to_host_gives_the_same_losses(tmp_path):
  small = {"train.max_steps": 4, "train.val_check_interval": 0, "train.save_interval": 0}
  on_device = run(load("dpo_tiny", tmp_path / "a", **small), log=quiet)["losses"]
  offloaded = run(load("dpo_tiny", tmp_path / "b", **small, **{"reference.offload": True}), log=quiet)["losses"]
  np.testing.assert_array_equal(list(offloaded.values()), list(on_device.values()))


def test_shared_prompt_rows_train_like_separate_sequences(tmp_path):
  """dpo.share_prompt computes each prompt once: the same pairs per row give the same losses."""
  small = {"train.max_steps": 4, "train.val_check_interval": 0, "train.save_interval": 0, "data.pack": False}
  plain = run(load("dpo_tiny", tmp_path / "a", **small), log=quiet)["losses"]
  shared = run(load("dpo_tiny", tmp_path / "b", **small, **{"dpo.share_prompt": True}), log=quiet)["losses"]
  assert shared[1] == pytest.approx(math.log(2), abs=1e-6)
  np.testing.assert_allclose(list(shared.values()), list(plain.values()), rtol=2e-5)


def test_orpo_trains_without_a_reference_toward_the_chosen_answers(tmp_path):
  """dpo.loss_type = "orpo" (beta as ORPO's lambda): no reference pass is built or planned, and both
  ORPO's terms fall, the odds-ratio one with the chosen answers' log-odds pulling ahead."""
  c = load("dpo_tiny", tmp_path / "orpo", **{"dpo.loss_type": "orpo", "dpo.beta": 5.0, "train.max_steps": 50,
                                              "train.val_check_interval": 50, "train.save_interval": 0})
  loop = build_trainer(c, log=quiet)
  assert loop.reference is None
  before = loop.validate()
  loop.run()
  after = loop.last_val
  assert after["val_nll"] < before["val_nll"] and after["val_or_loss"] < before["val_or_loss"] - 0.01, after
  assert after["val_log_odds_ratio_mean"] > before["val_log_odds_ratio_mean"], after
  c.mesh.update({"data": 8, "fsdp": 1, "tensor": 1, "pipeline": 1})
  [job] = plan(c, peak_flops=1e12)
  assert [s.name for s in job.steps] == ["train"]


def test_over_length_pairs_are_dropped_or_truncated_and_counted(tmp_path):
  stats = {}
  for mode in ("drop", "truncate"):
    c = load("dpo_tiny", tmp_path / mode, **{"data.max_seq_length": 52, "data.over_length": mode,
                                              "train.max_steps": 1, "train.val_check_interval": 0,
                                              "train.save_interval": 0})
    run(c, log=quiet)
    stats[mode] = json.loads((tmp_path / mode / "data_stats.json").read_text())
  assert stats["drop"]["dropped"] > 100 and stats["drop"]["truncated"] == 0
  assert stats["truncate"]["truncated"] > 100 and stats["truncate"]["dropped"] == 0
  assert stats["drop"]["examples"] + stats["drop"]["dropped"] == stats["truncate"]["examples"] == 512


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.dpo.loss_type: 'nope'"):
    config_lib.validate(load("dpo_tiny", tmp_path, **{"dpo.loss_type": "nope"}))
  with pytest.raises(config_lib.ConfigError, match="config.data.format: 'chat': algorithm dpo reads comparison"):
    config_lib.validate(load("dpo_tiny", tmp_path, **{"data.format": "chat"}))


def test_lora_dpo_trains_few_parameters_from_the_base_as_reference_and_saves_only_adapters(tmp_path):
  c = load("dpo_tiny", tmp_path / "lora", **{"lora.rank": 8, "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-3,
                                             "train.max_steps": 100, "train.val_check_interval": 100,
                                             "train.save_interval": 0})
  loop = build_trainer(c, log=quiet)
  trained, fixed = trainer.count(loop.state.params), trainer.count(loop.state.rest)
  assert trained / (trained + fixed) < 0.05, (trained, fixed)
  # B = 0 at the start: the policy is the base model, which is also the reference.
  assert loop.validate()["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
  after = loop.run()["val"]
  assert after["val_reward_margin_mean"] > 0.3 and after["val_accuracy"] > 0.75, after
  # The checkpoint's arrays (orbax's tree metadata: a write shape for every array it holds) are the
  # adapters, their Adam moments and counters: no base weight. (Its byte count is no measure: orbax's
  # own files vary in size from run to run.)
  metadata = json.loads((tmp_path / "lora" / "checkpoints" / "100" / "state" / "_METADATA").read_text())
  arrays = [ast.literal_eval(key) for key, value in metadata["tree_metadata"].items()  # keys: tuples
            if value["value_metadata"].get("write_shape") is not None]
  weights = [key for key in arrays if key[0] in ("params", "rest") or "mu" in key or "nu" in key]
  assert len(weights) == 3 * 6 and all("_lora_" in key[-2] for key in weights), weights

