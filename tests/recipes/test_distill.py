"""Knowledge distillation: the offline top-K step and a student trained on it through the shared loop."""

import numpy as np
import pytest

from jalign.recipes import distill
from jalign.recipes.build import build_trainer
from jalign.train import run

from tests.conftest import load, quiet


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  folder = tmp_path_factory.mktemp("teacher")
  run(load("sft_tiny", folder, **{"train.max_steps": 60, "train.val_check_interval": 0, "train.save_interval": 0,
                                  "data.max_seq_length": 64}), log=quiet)
  return folder


def kd_config(tmp_path, teacher, **overrides):
  return load("kd_tiny", tmp_path / "student", **{"kd.teacher": f"run:{teacher}", "kd.topk_dir": str(tmp_path / "topk"),
                                                  "data.max_seq_length": 64, "train.save_interval": 0, **overrides})


def test_student_learns_the_teachers_top_k(tmp_path, teacher):
  c = kd_config(tmp_path, teacher, **{"train.max_steps": 60, "train.val_check_interval": 60})
  written = distill.run(c, log=quiet)
  assert [p.name for p in written] == ["sft_chat_train.jsonl.topk.npz", "sft_chat_val.jsonl.topk.npz"]
  with np.load(written[1]) as f:
    assert f["ids"].shape == f["logits"].shape and f["ids"].shape[1] == 16
    assert np.all(np.diff(f["logits"], axis=1) <= 0)  # top-K in descending order
  loop = build_trainer(c, log=quiet)
  before = loop.validate()
  after = loop.run()["val"]
  assert after["val_kd_loss"] < 0.4 * before["val_kd_loss"], (before, after)


def test_top_k_made_for_other_tokens_is_refused(tmp_path, teacher):
  distill.run(kd_config(tmp_path, teacher, **{"train.max_steps": 1}), log=quiet)
  with pytest.raises(ValueError, match=r"sft_chat_train.jsonl.topk.npz: made for other token ids"):
    build_trainer(kd_config(tmp_path, teacher, **{"data.max_seq_length": 48, "train.max_steps": 1}), log=quiet)
  with pytest.raises(FileNotFoundError, match=r"no teacher top-K file; run python -m jalign.distill"):
    build_trainer(kd_config(tmp_path, teacher, **{"kd.topk_dir": str(tmp_path / "none"), "train.max_steps": 1}),
                  log=quiet)


def test_distill_command_needs_a_config():
  import subprocess
  import sys
  from pathlib import Path
  script = Path(sys.executable).parent / "jalign"
  done = subprocess.run([str(script), "distill"], capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--config=configs/<name>.py (a kd config) is required" in done.stderr
