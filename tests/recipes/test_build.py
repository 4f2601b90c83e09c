"""Run folders written by an earlier jalign still load and resume.

``fixtures/sft_tiny_before_recipes`` is a tiny SFT run stopped after 2 of 3 steps, saved by the code
before the algorithm drivers moved to ``jalign/recipes``; ``expected_losses.json`` holds the losses the
same run gave when it trained all 3 steps at once, on that code.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from jalign.models import Transformer
from jalign.config import load_config_file
from jalign.recipes.build import load_trained
from jalign.train import run
from tests.conftest import ROOT

FIXTURE = Path(__file__).parent / "fixtures" / "sft_tiny_before_recipes"


def _config(run_dir, steps):
  return load_config_file(ROOT / "configs" / "sft_tiny.py", {
      "run_dir": str(run_dir), "train.max_steps": steps, "train.save_interval": 2, "train.val_check_interval": 0,
      "data.validation": "", "train.keep_last": 1, "train.keep_best": 0, "data.max_seq_length": 64,
      "train.log_every": 1, "train.micro_batch_size": 1})


def test_an_old_run_folder_loads(tmp_path):
  folder = tmp_path / "old"
  shutil.copytree(FIXTURE, folder)
  model, tok, c = load_trained(folder)
  assert isinstance(model, Transformer) and c.algorithm == "sft"
  assert tok.vocab_size <= model.config.vocab_size


def test_an_old_run_folder_resumes_where_it_stopped(tmp_path):
  folder = tmp_path / "old"
  shutil.copytree(FIXTURE, folder)
  summary = run(_config(folder, 3), log=lambda *_: None)
  expected = json.loads((FIXTURE / "expected_losses.json").read_text())
  assert sorted(summary["losses"]) == [3]  # steps 1 and 2 came from the checkpoint
  np.testing.assert_allclose(summary["losses"][3], expected["3"], rtol=1e-6)
