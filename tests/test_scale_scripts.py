"""The real-size configs run as their docstrings and docs/scale.md say, through the scripts' local mode
(``JALIGN_LOCAL``: processes with fake CPU devices): ``model.init`` at the SmolLM2-135M Hugging Face
folder, each config's own mesh scaled to 4 devices (both fsdp and tensor over 2 where the config has
both), a few short steps. PPO's critic and reward model (SmolLM2-135M with a fresh value head, as a
Hugging Face reward model folder) run as a served job in a second process, which the actor finds
through the address file the critic's script writes."""

import json
import os
import subprocess
import sys

import pytest

from flax import nnx

from jalign.models import gguf, hf, hf_value
from jalign.models.heads import ValueModel
from tests.conftest import ROOT

SCRIPTS = ROOT / "scripts"
SHORT = ["--config.data.max_seq_length=64", "--config.train.log_every=1", "--config.data.validation="]


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory, smollm2_file):
  """SmolLM2-135M-Instruct as a Hugging Face folder (bfloat16 weights, its tokenizer and chat template)."""
  folder = tmp_path_factory.mktemp("smollm2") / "hf"
  model, tokenizer = gguf.load(smollm2_file)
  hf.save(model, folder, dtype="bfloat16", tokenizer=tokenizer)
  del model
  return folder


@pytest.fixture(scope="module")
def smollm2_reward_folder(tmp_path_factory, smollm2_file):
  """SmolLM2-135M-Instruct with a fresh value head, as a Hugging Face reward model folder (bfloat16): a
  reward model on the policy's vocabulary, as PPO needs."""
  folder = tmp_path_factory.mktemp("smollm2_rm") / "hf"
  model, tokenizer = gguf.load(smollm2_file)
  hf_value.save(ValueModel.from_transformer(model, 1, rngs=nnx.Rngs(0)), folder, dtype="bfloat16", tokenizer=tokenizer)
  del model
  return folder


def local_env(**extra) -> dict:
  return {**os.environ, "JALIGN_LOCAL": "1", "JALIGN_LOCAL_DEVICES": "4", "PYTHON": sys.executable, **extra}


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
              f"--config.run_dir={run_dir}", "--config.train.max_steps=2", "--config.train.global_batch_size=4",
              "--config.data.max_seq_length=32", "--config.mesh.fsdp=4", *SHORT[1:])  # fsdp 8 -> 4, a row each
  assert "training 134,515,008 of 134,515,008 parameters" in out  # SmolLM2-135M's, with its tied embedding
  steps = metrics(run_dir)
  assert [r["step"] for r in steps] == [1, 2]
  # Its own weights: a random model of this vocabulary starts near ln(49152) = 10.8.
  assert steps[0]["loss"] < 3.0
  assert saved_mesh(run_dir)["fsdp"] == 4
  assert (run_dir / "checkpoints" / "2").is_dir()


def test_dpo_llama3_70b_trains_the_pretrained_folder_with_its_reference_in_host_memory(tmp_path, smollm2_folder):
  run_dir = tmp_path / "dpo"
  train("--config=configs/dpo_llama3_70b.py", f"--config.model.init=hf:{smollm2_folder}", f"--config.run_dir={run_dir}",
        "--config.train.max_steps=3", "--config.train.global_batch_size=2", "--config.optimizer.lr=9e-6",
        "--config.optimizer.warmup_steps=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *SHORT)  # 4 x 8 -> 2 x 2
  losses = [r["loss"] for r in metrics(run_dir)]
  assert len(losses) == 3
  assert abs(losses[0] - 0.6931) < 1e-3  # the policy is its reference at the first step: log 2
  # After an update the policy is no longer its reference: the next batch's loss leaves log 2. (Whether
  # it is then lower depends on the batch and, in the last digits, on the CPU's vector units.)
  assert all(abs(loss - 0.6931) > 1e-5 for loss in losses[1:]) and max(losses) < 1.0
  config = json.loads((run_dir / "config.json").read_text())
  assert config["reference"]["offload"] and config["tokenizer"] == "model" and config["data"]["chat_template"] == "model"
  assert saved_mesh(run_dir)["tensor"] == 2


def test_ppo_70b_trains_against_its_critic_served_by_a_second_job(tmp_path, smollm2_folder, smollm2_reward_folder):
  import portpicker
  env = local_env(CRITIC_ADDRESS_FILE=str(tmp_path / "critic_address"), CRITIC_PORT=str(portpicker.pick_unused_port()))
  run_dir = tmp_path / "ppo"
  # Questions with one-word answers in SmolLM2's chat template: replies that end within 16 tokens, which
  # the actor trains on (a reply cut off by the length limit trains the critic only).
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"text": f"<|im_start|>user\n{q} Answer in one word.<|im_end|>\n"
                                                 "<|im_start|>assistant\n"}) + "\n"
                             for q in ["What is two plus two?", "What color is the sky on a clear day?",
                                       "How many legs does a cat have?", "What is the capital of France?"]))
  args = ["--config=configs/ppo_70b.py", f"--config.model.init=hf:{smollm2_folder}", f"--config.run_dir={run_dir}",
          f"--config.critic.init=hf:{smollm2_reward_folder}", f"--config.critic.reward_model=hf:{smollm2_reward_folder}",
          f"--config.data.train={prompts}", "--config.rollout.max_new_tokens=16", "--config.rollout.num_prompts=4",
          "--config.rollout.micro_batch_size=4", "--config.train.global_batch_size=4",
          "--config.critic.global_batch_size=4", "--config.train.max_steps=1",
          "--config.mesh.fsdp=2", "--config.mesh.tensor=2",  # the actor's 8 x 8 scaled to 2 x 2
          "--config.critic.mesh.fsdp=2", "--config.critic.mesh.tensor=2",  # the critic's 4 x 8 to 2 x 2
          "--config.data.max_seq_length=40", *SHORT[1:]]
  critic = script("ppo_critic.sbatch", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  start_new_session=True)
  try:
    out = finished(script("ppo_actor.sbatch", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  finally:
    os.killpg(critic.pid, 15)
    critic_out = critic.communicate(timeout=120)[0]
  assert "serving" in critic_out and "critic" in critic_out, critic_out[-3000:]
  assert "finished after 1 steps" in out
  rollout = metrics(run_dir, "rollout")[0]
  assert rollout["response_length"] > 0 and rollout["fraction_ended"] > 0 and "values_mean" in rollout
  [step] = metrics(run_dir)
  assert step["step"] == 1 and step["grad_norm"] > 0  # the actor trained on the replies that ended
  assert (run_dir / "checkpoints" / "1").is_dir() and (run_dir / "critic" / "checkpoints" / "1").is_dir()
