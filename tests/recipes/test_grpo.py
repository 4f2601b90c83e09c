"""GRPO: rollouts on problem data scored by reward functions, group advantages as numpy computes them,
the presets' shaping, and a short run through the CLI with its metrics and one-line failures."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jalign.recipes import grpo as grpo_recipe
from jalign.rewards import math_answers
from jalign.specs import grpo as grpo_spec
from jalign.specs.base import ConfigError
from tests.conftest import ROOT, load, quiet
from tests.losses.test_grpo import np_advantages

pytestmark = pytest.mark.many_steps

FUNCS = "tests.rewards.sample_functions"
# Dense rewards from the tiny policy: its response's length in characters (a tenth), plus the verifier.
REWARDS = f"{FUNCS}:length*0.1,jalign.rewards.math_answers:final_answer"


def grpo_config(tmp_path, sft_run, **overrides):
  return load("grpo_tiny", tmp_path / "grpo", **{
      "model.init": f"run:{sft_run}", "grpo.reward_functions": REWARDS, "rollout.num_prompts": 8,
      "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 32, "rollout.max_new_tokens": 8,
      "train.max_steps": 4, "train.save_interval": 2, "train.val_check_interval": 2, **overrides})


def first_rollout(c):
  loop, rollouts, rewards = grpo_recipe.build(c, log=quiet)
  try:
    batches = rollouts.rollout()
  finally:
    rewards.close()
  return rollouts, batches


def test_first_rollout_rewards_and_group_advantages(tmp_path, sft_run):
  c = grpo_config(tmp_path, sft_run, **{"grpo.preset": "grpo"})
  rollouts, batches = first_rollout(c)
  assert len(batches) == 2 and sorted(batches[0]) == sorted(grpo_recipe.specs.get("grpo").rollout.fields(c))
  batch = rollouts.prepared
  groups = batch["group_ids"]
  assert sorted(np.bincount(groups)) == [4] * 8
  # The rewards again, from the samples' text and their problems' answers.
  tok, order = rollouts.tok, rollouts._prompt_indices(0)
  lengths = (batch["segment_ids"] > 0).sum(1)
  want = []
  for i in range(len(groups)):
    prompt = rollouts.prompts[order[groups[i]]]
    response = batch["tokens"][i, len(prompt):lengths[i]].tolist()
    if response and response[-1] in rollouts.stop_ids:
      response = response[:-1]
    text = tok.decode(response)
    record = rollouts.records[order[groups[i]]]
    want.append(0.1 * len(text) + math_answers.final_answer("", text, record))
  np.testing.assert_allclose(batch["rewards"], want, rtol=1e-6)
  assert np.std(want) > 0  # the rewards differ, so the advantages below say something
  np.testing.assert_allclose(batch["advantages"], np_advantages(np.asarray(want), groups, True, 1e-6),
                             rtol=1e-5, atol=1e-6)
  # Step 0: the behaviour policy is the initial one, the KL term's reference.
  np.testing.assert_allclose(batch["old_logprobs"], batch["ref_logprobs"], atol=1e-6)
  assert rollouts.records[0]["where"].endswith("arithmetic_train.jsonl:1")


def test_dapo_masks_zero_variance_groups_and_shapes_overlong_responses(tmp_path, sft_run):
  # The verifier alone: the tiny policy rarely answers right, so most groups score all 0 and only the
  # overlong penalty (past 4 of the 8 new tokens) sets some samples apart.
  c = grpo_config(tmp_path, sft_run, **{"grpo.preset": "dapo", "grpo.overlong_fraction": 0.5,
                                        "grpo.reward_functions": "jalign.rewards.math_answers:final_answer",
                                        "grpo.max_resample_rounds": 0})
  rollouts, _ = first_rollout(c)
  batch = rollouts.prepared
  groups, mask = batch["group_ids"], batch["loss_mask"]
  lengths = mask.sum(1)
  penalty = np.where(lengths <= 4, 0.0, np.where(lengths <= 8, (4 - lengths) / 4, -1.0))
  shaped = batch["rewards"] + penalty
  want = np_advantages(shaped, groups, True, 1e-6)
  np.testing.assert_allclose(batch["advantages"], want, rtol=1e-5, atol=1e-6)
  flat = np.array([np.ptp(shaped[groups == g]) == 0 for g in groups])
  assert not mask[flat].any()
  assert (mask[~flat].sum(1) > 0).all()
  assert "ref_logprobs" not in batch  # dapo: no KL term


def test_dapo_replaces_zero_variance_groups_with_groups_of_more_prompts(tmp_path, sft_run):
  """Problems with an odd answer score 0 whatever the response: their groups are flat, and extra rounds
  of prompts drawn from the data replace them with groups of even answers."""
  c = grpo_config(tmp_path, sft_run, **{"grpo.preset": "dapo", "grpo.overlong_fraction": 0.0,
                                        "grpo.reward_functions": f"{FUNCS}:even_length", "grpo.max_resample_rounds": 4})
  rollouts, batches = first_rollout(c)
  batch = rollouts.prepared
  groups = batch["group_ids"]
  assert len(groups) == 32 and sorted(np.bincount(groups)[np.bincount(groups) > 0]) == [4] * 8
  first = rollouts.last  # the rollout's own groups, as scored
  informative = sorted(g for g in set(first["group_ids"].tolist())
                       if np.ptp(first["rewards"][first["group_ids"] == g]) > 0)
  assert len(informative) < 8  # some flat groups to replace
  assert sorted(g for g in set(groups.tolist()) if g < 8) == informative  # its informative groups all kept
  assert (groups >= 8).any()  # and groups of the extra rounds in place of the rest
  flat = np.array([np.ptp(batch["rewards"][groups == g]) == 0 for g in groups])
  assert not flat.any() and batch["loss_mask"].sum(1).min() > 0
  np.testing.assert_allclose(batch["advantages"], np_advantages(batch["rewards"], groups, True, 1e-6),
                             rtol=1e-5, atol=1e-6)
  assert all(b["tokens"].shape == batches[0]["tokens"].shape for b in batches)  # one width


@pytest.mark.parametrize("preset", sorted(grpo_spec.PRESETS))
def test_presets_and_overrides(tmp_path, preset):
  c = load("grpo_tiny", tmp_path, **{"grpo.preset": preset, "rollout.max_new_tokens": 12})
  settings = grpo_spec.loss_settings(c)
  table = grpo_spec.PRESETS[preset]
  assert settings["eps_low"] == table["eps_low"] and settings["aggregation"] == table["aggregation"]
  assert settings["norm_constant"] == 12.0
  c.grpo.eps_high = 0.5
  c.grpo.aggregation = "token_mean"
  settings = grpo_spec.loss_settings(c)
  assert settings["eps_high"] == 0.5 and settings["aggregation"] == "token_mean"


@pytest.mark.parametrize("key, value, message", [
    ("grpo.preset", "ppo", "config.grpo.preset: 'ppo' is not one of"),
    ("grpo.aggregation", "mean", "config.grpo.aggregation: 'mean' is not one of"),
    ("grpo.kl", "both", "config.grpo.kl: 'both' is not one of"),
    ("grpo.reward_functions", "", "config.grpo.reward_functions: no reward"),
    ("grpo.dual_clip", 0.5, "config.grpo.dual_clip: 0.5: 0 (off) or above 1"),
    ("rollout.samples_per_prompt", 1, "config.rollout.samples_per_prompt: must be at least 2"),
    ("data.format", "prompt", "config.grpo.reward_functions: reward functions read each prompt's record"),
])
def test_bad_settings_name_their_key(tmp_path, key, value, message):
  c = load("grpo_tiny", tmp_path, **{key: value})
  with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    grpo_spec.validate(c, check_files=False)


def cli(tmp_path, sft_run, *extra):
  args = [sys.executable, "-m", "jalign.train", f"--config={ROOT / 'configs' / 'grpo_tiny.py'}",
          f"--config.run_dir={tmp_path / 'run'}", f"--config.model.init=run:{sft_run}",
          "--config.rollout.num_prompts=8", "--config.rollout.samples_per_prompt=4",
          "--config.rollout.max_new_tokens=8", "--config.train.global_batch_size=16",
          "--config.train.micro_batch_size=1", "--config.train.save_interval=2", "--config.train.val_check_interval=2",
          *extra]
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_short_run_trains_and_logs_what_grpo_users_watch(tmp_path, sft_run):
  out = cli(tmp_path, sft_run, "--config.train.max_steps=4", f"--config.grpo.reward_functions={REWARDS},{FUNCS}:raises*0")
  assert out.returncode == 0, out.stderr[:4000]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  rollout = [r for r in rows if r["split"] == "rollout"]
  train = [r for r in rows if r["split"] == "train"]
  assert len(rollout) == 2 and len(train) == 4
  for key in ("reward", "reward/length", "reward/final_answer", "reward/raises", "zero_variance_groups",
              "reward_std_in_group", "response_length", "logprob_gap_mean", "init_policy_kl"):
    assert key in rollout[0], key
  assert rollout[0]["reward_failures"] == 32.0  # every call of the raising function, counted
  for key in ("loss", "policy_loss", "clip_low", "clip_high", "ratio", "kl", "grad_norm"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert "32 reward function calls failed and scored 0; first: reward function tests.rewards.sample_functions:raises " \
         "raised KeyError: 'id' on " in out.stdout
  assert (tmp_path / "run" / "checkpoints").is_dir()


def test_a_reward_function_that_fails_stops_the_run_in_one_line(tmp_path, sft_run):
  out = cli(tmp_path, sft_run, "--config.train.max_steps=2", f"--config.grpo.reward_functions={FUNCS}:raises",
            "--config.grpo.reward_on_error=stop")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: reward function {FUNCS}:raises raised KeyError: 'id' on ") and \
      "arithmetic_train.jsonl:" in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_grpo_raises_a_verifiable_reward(tmp_path, sft_run):
  """A reward code computes (shorter answers score higher): within 40 steps the policy's mean reward
  climbs well above where it started."""
  c = grpo_config(tmp_path, sft_run, **{"grpo.preset": "grpo", "grpo.reward_functions": f"{FUNCS}:length*-0.1",
                                        "rollout.num_prompts": 16, "rollout.samples_per_prompt": 8,
                                        "rollout.micro_batch_size": 64, "train.global_batch_size": 32,
                                        "train.micro_batch_size": 4, "train.max_steps": 40,
                                        "train.save_interval": 0, "train.val_check_interval": 0,
                                        "optimizer.lr": 3e-3, "optimizer.min_lr": 3e-3})
  loop, _, rewards = grpo_recipe.build(c, log=quiet)
  try:
    loop.run()
  finally:
    rewards.close()
  rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
  reward = [r["reward"] for r in rows if r["split"] == "rollout"]
  assert len(reward) == 10
  start, end = np.mean(reward[:2]), np.mean(reward[-3:])
  assert end > start + 0.3 * abs(start), reward
