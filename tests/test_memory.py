"""Built into their shardings, models and optimizer states cost a process no more than their own bytes:
each check is a fresh process of 8 fake CPU devices (``tests/memory_probe.py``) whose peak resident
memory may rise by at most 1.2x what it builds. Built whole and then sharded, a model needs 2x."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "memory_probe.py"
LIMIT = 1.2


def probe(mode: str, folder: Path) -> dict:
  done = subprocess.run([sys.executable, str(PROBE), mode, str(folder)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads((folder / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tmp_path_factory.mktemp("memory")


@pytest.fixture(scope="module")
def random_model(folder):
  """The random model's figures; its process also writes it as a Hugging Face folder for the next check."""
  return probe("random", folder)


def test_a_random_model_and_its_optimizer_state_are_made_in_their_shardings(random_model):
  out = random_model
  assert 1.9e9 < out["params_bytes"] < 2.2e9  # the ~2 GB model the check is about
  assert out["params_peak"] <= LIMIT * out["params_bytes"], out
  assert out["optimizer_peak"] <= LIMIT * out["optimizer_bytes"], out
  # Every array of the state holds on each device what the planner counts for it.
  assert out["differ_from_planner"] == [] and out["arrays"] > 10
  assert out["params_per_device"] == out["planned_params_per_device"] < out["params_bytes"] / 7.9


def test_a_hugging_face_folder_is_read_onto_the_mesh(folder, random_model):
  assert 0.9e9 < random_model["hf_bytes"] < 1.1e9
  out = probe("hf", folder)
  assert out["params_peak"] <= LIMIT * out["params_bytes"], out


def test_a_ppo_jobs_actor_reference_critic_and_reward_model_are_built_in_their_shardings(folder):
  probe("rm-folder", folder)
  out = probe("ppo", folder)
  assert set(out["bytes"]) == {"actor", "actor_optimizer", "reference", "critic", "critic_optimizer", "reward_model"}
  assert out["bytes"]["reference"] == out["bytes"]["actor"] and out["bytes"]["critic_optimizer"] > 0
  assert out["peak"] <= LIMIT * out["total_bytes"], out
