"""Reward-model inference: python -m jalign.score, reward standardisation, and the critic a reward model starts."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jalign.config import ConfigError, data_path
from jalign.parallel import mesh as pmesh
from jalign.recipes.reward import STANDARDIZATION_FILE, RewardModel
from jalign.train import run

from tests.conftest import ROOT, load, quiet


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("score") / "rm"
  run(load("rm_tiny", run_dir, **{"train.max_steps": 40, "train.val_check_interval": 0, "train.save_interval": 0}),
      log=quiet)
  return run_dir


@pytest.mark.many_steps
def test_rewards_are_the_models_last_token_values_standardised(rm_run):
  (rm_run / STANDARDIZATION_FILE).unlink(missing_ok=True)
  reward_model = RewardModel.load(rm_run)
  assert (reward_model.mean, reward_model.std) == (0.0, 1.0)  # without a standardisation file
  record = json.loads(data_path("bundled:pref_val.jsonl").read_text().splitlines()[0])
  examples = [reward_model.encode(record["prompt"], record[k]) for k in ("chosen_response", "rejected_response")]
  raw = reward_model.raw_scores(examples, batch_size=4)
  # One unpadded sequence at a time through the model itself.
  direct = [float(reward_model.model.score(jnp.asarray(ex.tokens)[None], [len(ex)])[0, 0]) for ex in examples]
  np.testing.assert_allclose(raw, direct, rtol=1e-5, atol=1e-5)
  reward_model.mean, reward_model.std = 0.5, 2.0
  np.testing.assert_allclose(reward_model.rewards(examples), (raw - 0.5) / 2.0, rtol=1e-6)


def test_rows_split_over_a_mesh_score_what_one_device_does(rm_run):
  reward_model = RewardModel.load(rm_run)
  records = [json.loads(line) for line in data_path("bundled:pref_val.jsonl").read_text().splitlines()[:6]]
  examples = [reward_model.encode(r["prompt"], r["chosen_response"]) for r in records]
  whole = reward_model.raw_scores(examples, batch_size=8)
  mesh = pmesh.make_mesh({"data": 4, "fsdp": 2, "pipeline": 1, "tensor": 1})
  placed = reward_model.place(mesh, pmesh.DEFAULT_RULES)
  assert placed.model.head.kernel.get_value().sharding.mesh == mesh
  # 8 rows over the 8 data-parallel devices; 6 over them would not divide and go whole.
  for batch_size in (8, 6):
    np.testing.assert_allclose(placed.raw_scores(examples, batch_size=batch_size), whole, rtol=1e-5, atol=1e-5)


def test_critic_starts_from_the_reward_model_with_its_own_weights(rm_run):
  reward_model = RewardModel.load(rm_run)
  critic = reward_model.critic()
  ex = reward_model.encode("Where is the Eiffel Tower?", "In Paris.")
  tokens = jnp.asarray(ex.tokens)[None]
  values = critic.values(tokens)
  assert values.shape == tokens.shape
  # A value per prefix; at the last token it is the reward model's score.
  np.testing.assert_allclose(values[0, len(ex) - 1], reward_model.raw_scores([ex])[0], rtol=1e-5, atol=1e-5)
  critic.head.bias[...] = critic.head.bias[...] + 1.0
  np.testing.assert_allclose(critic.values(tokens), values + 1.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reward_model.raw_scores([ex])[0], values[0, len(ex) - 1], rtol=1e-5, atol=1e-5)


def test_score_command_fits_the_standardisation_and_writes_rewards(rm_run, tmp_path):
  source = data_path("bundled:pref_val.jsonl")
  out = tmp_path / "scored.jsonl"
  done = subprocess.run([sys.executable, "-m", "jalign.score", f"--rm={rm_run}", f"--input={source}",
                         f"--output={out}", "--fit_standardization"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  scored = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(scored) == len(source.read_text().splitlines())
  chosen = np.array([r["chosen_reward"] for r in scored])
  rejected = np.array([r["rejected_reward"] for r in scored])
  both = np.concatenate([chosen, rejected])
  assert abs(both.mean()) < 1e-4 and abs(both.std() - 1.0) < 1e-3  # standardised on these responses
  accuracy = float(np.mean(chosen > rejected))
  assert f"chosen above rejected in {accuracy:.1%}" in done.stdout
  saved = json.loads((rm_run / STANDARDIZATION_FILE).read_text())
  assert saved["responses"] == 2 * len(scored) and saved["std"] > 0
  # Later inference applies it.
  reward_model = RewardModel.load(rm_run)
  assert (reward_model.mean, reward_model.std) == (saved["mean"], saved["std"])
  ex = reward_model.encode(scored[0]["prompt"], scored[0]["chosen_response"])
  assert reward_model.rewards([ex])[0] == pytest.approx(scored[0]["chosen_reward"], abs=1e-5)


def test_a_bad_standardisation_file_is_named(rm_run, tmp_path):
  import shutil
  broken = tmp_path / "rm"
  shutil.copytree(rm_run, broken)
  (broken / STANDARDIZATION_FILE).write_text(json.dumps({"mean": 0.0, "std": -1.0}))
  with pytest.raises(ConfigError, match=f"{broken / STANDARDIZATION_FILE}: std must be a positive number"):
    RewardModel.load(broken)


def test_score_refuses_a_folder_without_a_run(tmp_path):
  done = subprocess.run([sys.executable, "-m", "jalign.score", f"--rm={tmp_path}", "--input=x.jsonl",
                         f"--output={tmp_path / 'o.jsonl'}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and f"{tmp_path / 'config.json'}: not a jalign run folder" in done.stderr
  assert not (tmp_path / "o.jsonl").exists()
