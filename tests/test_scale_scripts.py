"""The real-size configs run as their docstrings and docs/scale.md say, through the scripts' local mode
(``JALIGN_LOCAL``: processes with fake CPU devices): ``model.init`` at the SmolLM2-135M Hugging Face
folder, each config's own mesh scaled to 8 devices, a few short steps."""

import json
import os
import subprocess
import sys

import pytest

from jalign.models import gguf, hf
from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"
pytestmark = pytest.mark.usefixtures("one_heavy_module_at_a_time")
SHORT = ["--config.data.max_seq_length=64", "--config.train.log_every=1", "--config.data.validation="]


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory, smollm2_file):
  """SmolLM2-135M-Instruct as a Hugging Face folder (bfloat16 weights, its tokenizer and chat template)."""
  folder = tmp_path_factory.mktemp("smollm2") / "hf"
  model, tokenizer = gguf.load(smollm2_file)
  hf.save(model, folder, dtype="bfloat16", tokenizer=tokenizer)
  del model
  return folder


def local_env(**extra) -> dict:
  return {**os.environ, "JALIGN_LOCAL": "1", "JALIGN_LOCAL_DEVICES": "8", "PYTHON": sys.executable, **extra}


def script(name: str, *args, env=None, **popen) -> subprocess.Popen:
  return subprocess.Popen([str(SCRIPTS / name), *args], cwd=ROOT, env=env or local_env(), text=True, **popen)


def finished(process: subprocess.Popen, timeout: int = 400) -> str:
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-4000:]
  return out


def train(*args) -> str:
  return finished(script("train.sbatch", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


def metrics(run_dir, split="train") -> list[dict]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["split"] == split]


def saved_mesh(run_dir) -> dict:
  return json.loads((run_dir / "config.json").read_text())["mesh"]


def test_sft_llama3_8b_trains_the_pretrained_folder(tmp_path, smollm2_folder):
  run_dir = tmp_path / "sft"
  out = train("--config=configs/sft_llama3_8b.py", f"--config.model.init=hf:{smollm2_folder}",
              f"--config.run_dir={run_dir}", "--config.train.max_steps=2", "--config.train.global_batch_size=8", *SHORT)
  assert "training 134,515,008 of 134,515,008 parameters" in out  # SmolLM2-135M's, with its tied embedding
  steps = metrics(run_dir)
  assert [r["step"] for r in steps] == [1, 2]
  # Its own weights: a random model of this vocabulary starts near ln(49152) = 10.8.
  assert steps[0]["loss"] < 3.0
  assert saved_mesh(run_dir)["fsdp"] == 8
  assert (run_dir / "checkpoints" / "2").is_dir()


def test_dpo_llama3_70b_trains_the_pretrained_folder_with_its_reference_in_host_memory(tmp_path, smollm2_folder):
  run_dir = tmp_path / "dpo"
  train("--config=configs/dpo_llama3_70b.py", f"--config.model.init=hf:{smollm2_folder}", f"--config.run_dir={run_dir}",
        "--config.train.max_steps=3", "--config.train.global_batch_size=2", "--config.optimizer.lr=9e-6",
        "--config.optimizer.warmup_steps=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=4", *SHORT)  # 4 x 8 -> 2 x 4
  losses = [r["loss"] for r in metrics(run_dir)]
  assert len(losses) == 3
  assert abs(losses[0] - 0.6931) < 1e-3  # the policy is its reference at the first step: log 2
  assert losses[2] < losses[0]  # two updates toward the chosen answers of pairs like these (seeded: repeatable)
  config = json.loads((run_dir / "config.json").read_text())
  assert config["reference"]["offload"] and config["tokenizer"] == "model" and config["data"]["chat_template"] == "model"
  assert saved_mesh(run_dir)["tensor"] == 4

