"""REINFORCE with the RLOO baseline: rollouts from the current policy scored by a jalign reward model,
advantages as plain numpy computes them, and the shared loop's checkpoints and resume."""

import json
import re

import numpy as np
import pytest

from jalign import config as config_lib
from jalign.recipes import reinforce
from jalign.data.sft import Example
from jalign.recipes.reward import RewardModel
from jalign.train import run
from tests.losses.test_ppo import np_rloo
from tests.conftest import load, quiet


def reinforce_config(tmp_path, reward_run, sft_run, **overrides):
  return load("reinforce_tiny", tmp_path / "rf", **{
      "model.init": f"run:{sft_run}", "reinforce.reward_model": f"run:{reward_run}", "rollout.num_prompts": 8,
      "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 32, "rollout.max_new_tokens": 12,
      "reinforce.kl_coef": 0.5, "train.max_steps": 4, "train.save_interval": 2, "train.val_check_interval": 2,
      **overrides})


def test_first_rollout_scores_and_advantages(tmp_path, reward_run, sft_run):
  c = reinforce_config(tmp_path, reward_run, sft_run)
  loop, rollouts = reinforce.build(c, log=quiet)
  batches = rollouts.rollout()
  assert len(batches) == 2 and all(len(b["tokens"]) == 16 for b in batches)
  assert sorted(batches[0]) == sorted(reinforce.specs.get("reinforce").rollout.fields(c))  # what the step reads
  batch = rollouts.prepared  # the whole rollout, in sampling order, with what it was prepared from
  groups, ended, rewards = batch["group_ids"], batch["is_end"], batch["rewards"]
  assert sorted(np.bincount(groups)) == [4] * 8
  # Rewards: the reward model's scores of the sampled sequences, computed again here.
  lengths = (batch["segment_ids"] > 0).sum(1)
  examples = [Example(batch["tokens"][i, :n], np.zeros(n, bool)) for i, n in enumerate(lengths)]
  np.testing.assert_allclose(rewards, RewardModel.load(reward_run).rewards(examples), rtol=1e-5, atol=1e-6)
  # At step 0 the policy is its initial self: no KL, so the advantage is the reward minus RLOO's baseline
  # (kl_coef 0.5 would show any difference).
  np.testing.assert_allclose(batch["advantages"], rewards - np_rloo(rewards, groups, ended), rtol=1e-5, atol=1e-6)
  # The loss covers the responses of the samples that ended, up to their last token.
  mask = batch["loss_mask"]
  assert not mask[~ended].any()
  for i in np.flatnonzero(ended):
    covered = np.flatnonzero(mask[i])
    assert covered[-1] == lengths[i] - 2 and np.all(np.diff(covered) == 1)
  assert set(batch["tokens"][ended, lengths[ended] - 1].tolist()) <= set(rollouts.stop_ids)
  # The fine-tuned policy ends enough replies for groups with baselines: advantages are not all zero.
  assert ended.sum() >= 4 and np.abs(batch["advantages"]).max() > 1e-3


def test_continuous_batching_rolls_out_the_same_samples_in_rows_as_wide_as_the_longest(tmp_path, reward_run,
                                                                                      sft_run):
  prepared = {}
  for continuous in (False, True):  # 4 static batches of 8, or 8 slots the 32 samples flow through
    c = reinforce_config(tmp_path / str(continuous), reward_run, sft_run, **{
        "rollout.continuous_batching": continuous, "rollout.micro_batch_size": 8, "rollout.pad_to_multiple": 8})
    rollouts = reinforce.build(c, log=quiet)[1]
    rollouts.rollout()
    prepared[continuous] = rollouts.prepared
  static, flowing = prepared[False], prepared[True]
  for key in ("tokens", "loss_mask", "is_end", "group_ids"):
    np.testing.assert_array_equal(flowing[key], static[key])
  for key in ("rewards", "advantages", "engine_logprobs"):
    np.testing.assert_allclose(flowing[key], static[key], rtol=1e-5, atol=1e-6)
  # The rows are as wide as the longest sample rounded up to 8 tokens, not data.max_seq_length (80).
  longest = int((static["segment_ids"] > 0).sum(1).max())
  assert static["tokens"].shape[1] == -(-longest // 8) * 8 < c.data.max_seq_length


def test_training_logs_rollouts_and_resumes_at_the_next_one(tmp_path, reward_run, sft_run):
  summary = run(reinforce_config(tmp_path, reward_run, sft_run, **{"rollout.tis_cap": 2.0}), log=quiet)
  assert summary["steps"] == 4 and all(np.isfinite(list(summary["losses"].values())))
  rows = [json.loads(line) for line in open(tmp_path / "rf" / "metrics.jsonl")]
  rollout_rows = [r for r in rows if r["split"] == "rollout"]
  assert [r["step"] for r in rollout_rows] == [0, 2]
  assert rollout_rows[0]["init_policy_kl"] == 0.0 and rollout_rows[1]["init_policy_kl"] > 0.0
  # Engine and trainer compute the same float32 model: their gap is rounding, and the truncated
  # importance weights the loss applies are 1 to as much.
  assert all(0 <= r["logprob_gap_mean"] <= r["logprob_gap_max"] < 1e-3 and 0 <= r["logprob_gap_kl"] < 1e-6
             for r in rollout_rows)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert len(train_rows) == 4 and all(abs(r["tis_weight"] - 1) < 1e-3 for r in train_rows)
  # Validation: one reply to each validation prompt, scored, at every val_check_interval.
  val_rows = [r for r in rows if r["split"] == "val"]
  assert [r["step"] for r in val_rows] == [2, 4] and all(np.isfinite(r["val_reward"]) for r in val_rows)
  assert summary["val"]["val_reward"] == pytest.approx(val_rows[-1]["val_reward"])
  summary = run(reinforce_config(tmp_path, reward_run, sft_run, **{"train.max_steps": 6, "rollout.tis_cap": 2.0}),
                log=quiet)
  assert summary["steps"] == 6 and sorted(summary["losses"]) == [5, 6]
  rows = [json.loads(line) for line in open(tmp_path / "rf" / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "rollout"] == [0, 2, 4]


def test_a_bfloat16_engine_shows_its_gap_and_tis_weights_correct_for_it(tmp_path, reward_run, sft_run):
  said = []
  c = reinforce_config(tmp_path, reward_run, sft_run, **{"model.dtype": "bfloat16", "rollout.tis_cap": 2.0})
  loop, rollouts = reinforce.build(c, log=said.append)
  batches = rollouts.rollout()
  assert "tis_weights" in batches[0]
  logged = dict(re.findall(r"(logprob_gap_\w+)=([0-9.e+-]+)", said[-1]))
  assert float(logged["logprob_gap_mean"]) > 1e-3 and float(logged["logprob_gap_kl"]) > 0  # bfloat16 rounding
  prepared = rollouts.prepared
  old, _ = rollouts.logprobs(prepared)
  engine, weights, on = prepared["engine_logprobs"], prepared["tis_weights"], prepared["loss_mask"] > 0
  want = np.minimum(np.exp(old.astype(np.float64) - engine.astype(np.float64)), 2.0)
  np.testing.assert_allclose(weights[on], want[on], rtol=1e-6)
  assert (weights[on] != 1).any() and weights.max() <= 2.0


def test_a_reward_model_is_required_and_must_fit(tmp_path, reward_run, sft_run):
  with pytest.raises(config_lib.ConfigError, match="config.reinforce.reward_model"):
    run(reinforce_config(tmp_path, reward_run, sft_run, **{"reinforce.reward_model": ""}), log=quiet)
  with pytest.raises(config_lib.ConfigError, match="config.reinforce.reward_model: it scores up to 80"):
    run(reinforce_config(tmp_path, reward_run, sft_run, **{"data.max_seq_length": 96}), log=quiet)


def test_rejection_sampling_trains_on_each_prompts_best_sample(tmp_path, reward_run, sft_run):
  c = load("rs_tiny", tmp_path / "rs", **{
      "model.init": f"run:{sft_run}", "reinforce.reward_model": f"run:{reward_run}",
      "rollout.num_prompts": 16, "rollout.samples_per_prompt": 4,
      "rollout.micro_batch_size": 32, "rollout.max_new_tokens": 12, "rs.top_n_rollouts": 2,
      "train.max_steps": 4, "train.save_interval": 4, "train.val_check_interval": 4})
  loop, rollouts = reinforce.build(c, log=quiet)
  batches = rollouts.rollout()
  kept = rollouts.prepared
  every = rollouts.last
  want = []
  for g in range(16):  # each prompt's two best samples, by a plain loop
    members = [i for i in range(64) if every["group_ids"][i] == g]
    want += sorted(members, key=lambda i: (-every["rewards"][i], i))[:2]
  row = lambda b, i: (int(b["group_ids"][i]), float(b["rewards"][i]), b["tokens"][i].tobytes())
  assert sorted(row(kept, i) for i in range(len(kept["tokens"]))) == sorted(row(every, i) for i in want)
  assert len(batches) == 2 and "advantages" not in kept
  c.run_dir = str(tmp_path / "rs_run")  # a run of its own, beside the rollout inspected above
  summary = run(c, log=quiet)
  assert summary["steps"] == 4 and all(np.isfinite(list(summary["losses"].values())))
  rows = [json.loads(line) for line in open(tmp_path / "rs_run" / "metrics.jsonl")]
  rollout_rows = [r for r in rows if r["split"] == "rollout"]
  assert [r["step"] for r in rollout_rows] == [0, 2]
  assert all(r["selected_reward"] >= r["reward"] for r in rollout_rows)
