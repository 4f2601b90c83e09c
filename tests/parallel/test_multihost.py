"""Two processes x 4 CPU devices with jax.distributed: same losses as one process with 8 devices,
a checkpoint saved by both, restored by one process onto another mesh; PPO's rollouts, scores, critic
and actor, and GRPO's rollouts, rewards and steps, the same over two processes as in one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
from flax import nnx

from jalign.config import load_config_file
from jalign.recipes.build import build_trainer
from tests.conftest import CPU_XLA_FLAGS, run_job

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
COMMON = [f"--config.train.max_steps={STEPS}", "--config.train.val_check_interval=0",
          "--config.train.save_interval=0", "--config.data.max_seq_length=64",
          "--config.train.global_batch_size=8", "--config.train.micro_batch_size=1", "--config.data.validation="]


def _launch(run_dir, processes, devices_each, config="sft_tiny", common=COMMON):
  return run_job("jalign.train", [f"--config=configs/{config}.py", *common, f"--config.run_dir={run_dir}"],
                 processes, devices_each)


def _metrics(run_dir, split, key):
  rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return [r[key] for r in rows if r["split"] == split and key in r]


def _losses(run_dir):
  return _metrics(run_dir, "train", "loss")


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
  _launch(tmp_path / "one", 1, 8)
  outs = _launch(tmp_path / "two", 2, 4)
  assert "run folder" in outs[0][0] and "run folder" not in outs[1][0]  # process 0 speaks for the job
  single, multi = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(single) == len(multi) == STEPS
  np.testing.assert_allclose(multi, single, rtol=1e-5)

  # Restore the two-process checkpoint here, in one process, on two other meshes.
  params = []
  for sizes in ({"fsdp": 4, "tensor": 2}, {"data": 8}):
    c = load_config_file(ROOT / "configs" / "sft_tiny.py", {
        "run_dir": str(tmp_path / "two"), "train.max_steps": STEPS, "data.max_seq_length": 64,
        "train.global_batch_size": 8, "train.micro_batch_size": 1, "data.validation": ""})
    c.mesh.update({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **sizes})
    loop = build_trainer(c, log=lambda *_: None)
    assert loop.restore() == STEPS and int(loop.state.step) == STEPS
    q = loop.state.params["layers"]["attn"]["q_proj"].get_value()
    if sizes.get("tensor"):
      assert q.sharding.spec == jax.sharding.PartitionSpec("pipeline", "fsdp", "tensor", None)
    params.append([np.asarray(v.get_value()) for _, v in nnx.to_flat_state(loop.state.params)])
  for a, b in zip(*params):
    np.testing.assert_array_equal(a, b)


def test_ppo_over_two_processes_matches_one(tmp_path, reward_run, sft_run):
  """Every process computes the whole rollout (generation, reward, values, log-probs) as one program
  over the job's devices and trains on its rows of each batch: the numbers are one process's. The
  policy is the fine-tuned tiny one, which ends replies: the actor trains on those."""
  common = [f"--config.model.init=run:{sft_run}", f"--config.critic.init=run:{reward_run}",
            f"--config.critic.reward_model=run:{reward_run}", "--config.rollout.num_prompts=8",
            "--config.rollout.micro_batch_size=8", "--config.rollout.max_new_tokens=12",
            "--config.train.global_batch_size=8", "--config.train.micro_batch_size=1",
            "--config.critic.global_batch_size=8", "--config.critic.micro_batch_size=1", "--config.train.max_steps=2",
            "--config.train.save_interval=2", "--config.train.val_check_interval=0"]
  _launch(tmp_path / "one", 1, 8, "ppo_tiny", common)
  _launch(tmp_path / "two", 2, 4, "ppo_tiny", common)
  for split, key in (("train", "loss"), ("rollout", "reward"), ("rollout", "response_length"),
                     ("rollout", "values_mean"), ("critic", "loss")):
    single, multi = _metrics(tmp_path / "one", split, key), _metrics(tmp_path / "two", split, key)
    assert len(single) == len(multi) == 2, (split, key)
    np.testing.assert_allclose(multi, single, rtol=1e-4, atol=1e-6, err_msg=f"{split} {key}")
  assert _metrics(tmp_path / "two", "train", "loss")[1] != 0  # the second step trains on a real surrogate
  for job in ("", "critic/"):  # actor and critic checkpoints, saved by both processes together
    assert sorted(p.name for p in (tmp_path / "two" / job / "checkpoints").iterdir()) == ["2"]


def test_grpo_over_two_processes_matches_one(tmp_path, sft_run):
  """GRPO's rollouts, rewards from functions (each process runs its own reward workers) and steps: the
  same numbers over two processes as in one."""
  common = [f"--config.model.init=run:{sft_run}", "--config.rollout.num_prompts=4",
            "--config.rollout.samples_per_prompt=4", "--config.rollout.micro_batch_size=2",
            "--config.rollout.max_new_tokens=8",
            "--config.grpo.reward_functions=tests.rewards.sample_functions:length*0.1,"
            "jalign.rewards.math_answers:final_answer", "--config.train.global_batch_size=8",
            "--config.train.micro_batch_size=1", "--config.train.max_steps=2", "--config.train.save_interval=2",
            "--config.train.val_check_interval=0"]
  _launch(tmp_path / "one", 1, 8, "grpo_tiny", common)
  _launch(tmp_path / "two", 2, 4, "grpo_tiny", common)
  for split, key in (("train", "loss"), ("train", "kl"), ("rollout", "reward"), ("rollout", "response_length"),
                     ("rollout", "advantage_abs")):
    single, multi = _metrics(tmp_path / "one", split, key), _metrics(tmp_path / "two", split, key)
    assert len(single) == len(multi) == (2 if split == "train" else 1), (split, key)
    np.testing.assert_allclose(multi, single, rtol=1e-4, atol=1e-6, err_msg=f"{split} {key}")
  assert _metrics(tmp_path / "two", "rollout", "advantage_abs")[0] > 0  # the rewards differ within groups
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2"]


def test_followers_make_process_zeros_calls_until_released():
  """A server job's processes: process 0 calls (through LeaderCalls), process 1 makes the same calls
  (follow), so computations over both processes' devices complete; a failing call does not stop the
  loop; stop_followers ends it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=CPU_XLA_FLAGS)
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "parallel" / "leader_job.py"), str(i), str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  leader, follower = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
  assert leader["sums"] == [28.0, 8.0] and leader["local"] == "process 0 alone"
  assert leader["error"] == "asked to fail" and leader["after_error"] == 8.0
  assert follower["calls"] == leader["calls"] == [
      ["total", list(range(8)), 1.0], ["total", [1.0] * 16, 0.5], ["fail"], ["total", [1.0] * 8, 1.0]]


def test_a_process_that_fails_alone_ends_the_job_within_seconds(tmp_path):
  """Process 1 cannot read its data (the file is missing on its host); process 0 has read its own and
  waits for process 1 in the first collective: it ends with process 1's error, not at the coordinator's
  heartbeat timeout."""
  import time

  from tests.conftest import launch_job
  args = ["--config=configs/sft_tiny.py", *COMMON, f"--config.run_dir={tmp_path / 'run'}"]
  missing = tmp_path / "elsewhere.jsonl"
  began = time.monotonic()
  procs = launch_job("jalign.train", args, 2, 4, only={1: [f"--config.data.train={missing}"]},
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  outs = [p.communicate(timeout=120) for p in procs]
  assert time.monotonic() - began < 30
  assert all(p.returncode != 0 for p in procs)
  assert outs[0][1].strip().splitlines()[-1].startswith("error: process 1: ") and str(missing) in outs[0][1]


def test_the_readmes_local_two_process_command_trains_and_logs_in_the_run_folder(tmp_path):
  run_dir = tmp_path / "run"
  out = subprocess.run(["scripts/launch_local.sh", "2", "--config=configs/sft_tiny.py", "--config.train.micro_batch_size=4",
                        "--config.train.max_steps=2", "--config.train.val_check_interval=0", f"--config.run_dir={run_dir}"],
                       cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "finished after 2 steps" in out.stdout
  assert (run_dir / "process_1.log").is_file() and (run_dir / "checkpoints" / "2").is_dir()
