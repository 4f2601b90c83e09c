"""The planner: exact weight and optimizer bytes, each job's steps compiled, and the shipped configs
fitting in 80 GB per device on their meshes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jalign.models import LlamaConfig
from jalign.plan import plan
from jalign.parallel.mesh import DEFAULT_RULES, inference_rules
from jalign.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def tiny_bytes(shards: int, itemsize: int = 4) -> int:
  """Bytes per device of the tiny model with every matrix split ``shards`` ways, norm scales whole."""
  cfg = LlamaConfig.preset("tiny")
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
  return itemsize * ((cfg.num_params - norms) // shards + norms)


def test_parameter_and_optimizer_bytes_are_exact():
  c = load_config_file(ROOT / "configs" / "sft_tiny.py", {"train.micro_batch_size": 1})
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 1, "pipeline": 1})
  [p] = plan(c, peak_flops=1e12)
  assert p.params_bytes == tiny_bytes(8)
  assert p.optimizer_bytes == 2 * p.params_bytes + 8  # Adam's two moments; its and the schedule's counts
  train = p.step("train")
  assert p.mesh["fsdp"] == 8 and train.temp_bytes > 0 and train.flops > 0 and train.donated


@pytest.mark.parametrize("offload,lora", [(False, 0), (True, 0), (False, 4)])
def test_dpo_plan_counts_the_reference_copy(offload, lora):
  c = load_config_file(ROOT / "configs" / "dpo_tiny.py", {"train.micro_batch_size": 1, "reference.offload": offload,
                                                          "lora.rank": lora})
  c.mesh.update({"data": 2, "fsdp": 4, "tensor": 1, "pipeline": 1})
  [p] = plan(c, peak_flops=1e12)
  reference, train = p.step("reference log-probs"), p.step("train")
  # The frozen copy of the starting weights stays on the devices through the train step, unless it
  # lives in host memory, or LoRA makes it the base model with adapters off (no copy).
  trainable = p.params_bytes if not lora else train.resident_bytes
  assert train.resident_bytes == (0 if offload or lora else trainable)
  assert reference.flops == pytest.approx(train.flops / 3)  # forward only, no remat in the tiny config
  assert not reference.donated and reference.resident_bytes >= p.optimizer_bytes


def test_inference_rules_keep_tensor_parallel_only():
  rules = dict(inference_rules(DEFAULT_RULES))
  assert rules["embed"] is None and rules["heads"] == "tensor" and rules["vocab"] == "tensor"
  assert rules["batch"] == dict(DEFAULT_RULES)["batch"] and rules["act_mlp"] == "tensor"


@pytest.mark.parametrize("offload_adam", [True, False])
def test_ppo_plan_has_actor_and_critic_jobs(offload_adam):
  c = load_config_file(ROOT / "configs" / "ppo_70b.py", {
      "model.preset": "tiny", "critic.preset": "tiny", "model.remat": "none", "data.max_seq_length": 128,
      "rollout.max_new_tokens": 64, "rollout.num_prompts": 32, "rollout.micro_batch_size": 2,
      "ppo.offload_adam_states": offload_adam, "train.global_batch_size": 8, "critic.global_batch_size": 8})
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  c.critic.mesh.update({"data": 1, "fsdp": 2, "tensor": 2, "pipeline": 1})
  actor, critic = plan(c, peak_flops=1e12)
  assert actor.mesh["fsdp"] == 4 and critic.mesh["fsdp"] == 2
  assert [s.name for s in actor.steps] == ["rollout", "policy log-probs", "actor train"]
  assert [s.name for s in critic.steps] == ["values", "rewards", "critic train"]
  assert actor.params_bytes == tiny_bytes(8)
  rollout = actor.step("rollout")
  # The generation copy: compute dtype, tensor parallel only; then prompts, lengths and a key.
  assert tiny_bytes(2, itemsize=2) <= rollout.argument_bytes < tiny_bytes(2, itemsize=2) + 4096
  # Beside it: the trained weights, the initial policy, and the optimizer state unless offloaded.
  assert rollout.resident_bytes == 2 * actor.params_bytes + (0 if offload_adam else actor.optimizer_bytes)
  # 32 prompts, 2 per data-parallel rank of 4 at a time: 4 rounds, and log-probs twice per round
  # (policy and initial policy); 32 samples in optimizer steps of 8. The critic job reads the 32
  # samples critic.global_batch_size (8) at a time: 4 passes of values and of rewards, 4 critic steps.
  assert (rollout.repeats, actor.step("policy log-probs").repeats, actor.step("actor train").repeats) == (4, 8, 4)
  assert [critic.step(name).repeats for name in ("values", "rewards", "critic train")] == [4, 4, 4]
  assert actor.seconds == pytest.approx(sum(s.repeats * s.seconds for s in actor.steps))


@pytest.mark.parametrize("algorithm", ["reinforce", "rs"])
def test_reinforce_and_rejection_sampling_plans_score_in_the_actor_job(algorithm, reward_run):
  c = load_config_file(ROOT / "configs" / f"{algorithm}_tiny.py", {
      "reinforce.reward_model": f"run:{reward_run}", "rollout.num_prompts": 16,
      "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 4, "rs.top_n_rollouts": 1,
      "train.global_batch_size": 16, "train.micro_batch_size": 2})
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  (actor,) = plan(c, peak_flops=1e12)
  kl = algorithm == "reinforce"
  assert [s.name for s in actor.steps] == ["rollout", "rewards"] + ["policy log-probs"] * kl + ["actor train"]
  # 64 samples, 4 per data-parallel rank of 4 at a time: 4 rounds of generation and scoring; the KL's two
  # log-prob passes per round; REINFORCE trains on all 64 samples in steps of 16, rejection sampling on
  # each prompt's best one (16: one step).
  assert actor.step("rollout").repeats == actor.step("rewards").repeats == 4
  assert actor.step("actor train").repeats == (4 if kl else 1)
  if kl:
    assert actor.step("policy log-probs").repeats == 8
  # Beside generation: the trained weights and optimizer state, and the frozen initial policy for the KL.
  assert actor.step("rollout").resident_bytes == (1 + kl) * actor.params_bytes + actor.optimizer_bytes


def test_spin_plan_generates_then_trains_as_dpo():
  c = load_config_file(ROOT / "configs" / "spin_tiny.py", {
      "data.max_seq_length": 128, "rollout.max_new_tokens": 32, "rollout.micro_batch_size": 8,
      "train.global_batch_size": 8, "train.micro_batch_size": 1})
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  (job,) = plan(c, peak_flops=1e12, hbm_bytes_per_s=1e12)
  assert [s.name for s in job.steps] == ["generation", "reference log-probs", "train"]
  generation = job.step("generation")
  # The trained weights (float32 here, sharded like training's) are read once for each of 32 new tokens.
  assert generation.resident_bytes == 0 and generation.argument_bytes >= job.params_bytes
  assert generation.seconds >= 32 * job.params_bytes / 1e12


def _peaks(stdout: str) -> list[float]:
  return [float(x) for x in re.findall(r"peak ([0-9.]+) GiB", stdout)]


@pytest.mark.parametrize("name,params,meshes", [
    ("sft_llama3_8b", "8.03B", ["fsdp=8"]),
    ("dpo_llama3_70b", "70.55B", ["fsdp=4 tensor=8"]),
    ("rm_llama3_70b", "70.55B", ["fsdp=4 tensor=8"]),
    ("kto_llama3_8b", "8.03B", ["fsdp=8"]),
    ("kd_llama3_8b", "8.03B", ["fsdp=8"]),
    ("steerlm2_llama3_8b", "8.03B", ["fsdp=2 tensor=4"]),
    ("ppo_70b", "70.55B", ["fsdp=8 tensor=8", "fsdp=4 tensor=8"]),
    ("ppo_405b", "405.85B", ["data=16 fsdp=2 tensor=8", "data=16 fsdp=2 tensor=8"]),
])
def test_shipped_configs_fit_in_80_gb(name, params, meshes):
  out = subprocess.run([sys.executable, "-m", "jalign.plan", f"--config=configs/{name}.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  peaks = _peaks(out.stdout)
  assert len(peaks) == len(meshes) and all(5 < p < 80 for p in peaks), out.stdout
  for mesh in meshes:
    assert f"{params} parameters on mesh {mesh}" in out.stdout, out.stdout


@pytest.mark.parametrize("preset, kl", [("grpo", True), ("dapo", False)])
def test_grpo_plan_generates_and_scores_with_functions_alone(preset, kl):
  """Rewards from functions: no reward model step; pi_old always, pi_init only with a KL term."""
  c = load_config_file(ROOT / "configs" / "grpo_tiny.py", {
      "model.init": "random", "model.preset": "tiny", "grpo.preset": preset, "rollout.num_prompts": 16,
      "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 4, "train.global_batch_size": 16,
      "train.micro_batch_size": 2})
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  (actor,) = plan(c, peak_flops=1e12)
  assert [s.name for s in actor.steps] == ["rollout", "policy log-probs", "actor train"]
  assert actor.step("policy log-probs").repeats == (2 if kl else 1) * 4
  assert actor.step("actor train").repeats == 4
  assert actor.step("rollout").resident_bytes == (1 + kl) * actor.params_bytes + actor.optimizer_bytes
