"""Shared test set-up: 8 fake CPU devices, the persistent compilation cache, offline Hugging Face."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JALIGN_CACHE", str(ROOT / ".cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def smollm2_file():
  from jalign.models.pretrained import smollm2_path
  return smollm2_path()


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory):
  """A tiny reward model run (two steps: any fixed scorer will do), for the algorithms that need one."""
  from jalign.train import run
  from tests.test_preference_training import load, quiet
  folder = tmp_path_factory.mktemp("rm") / "rm"
  run(load("rm_tiny", folder, **{"train.max_steps": 2, "train.val_check_interval": 0, "train.save_interval": 0}),
      log=quiet)
  return folder


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
  """A briefly fine-tuned tiny policy: it ends most replies with the chat format's turn start."""
  from jalign.train import run
  from tests.test_preference_training import load, quiet
  folder = tmp_path_factory.mktemp("sft") / "sft"
  run(load("sft_tiny", folder, **{"train.max_steps": 120, "train.val_check_interval": 0, "train.save_interval": 0}),
      log=quiet)
  return folder
