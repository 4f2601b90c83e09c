"""The generation server as the rollout engine (``rollout.engine="served"``): ``python -m jalign.serve``
of a tiny policy in a process of its own on loopback, refitted from the actor in this process at every
rollout, against the local engine; a refit cut off midway; the next rollout generated while the actor
trains (``rollout.max_staleness``); an actor whose engine server dies. (The generation server's own
endpoints: test_critic_server.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jalign.config import load_config_file
from jalign.recipes import grpo, ppo, reinforce
from jalign.recipes.build import build_model, build_tokenizer
from jalign.rollout import engine as engine_lib
from jalign.rollout import refit
from jalign.rollout.sampling import Request
from jalign.serve.generation import RemoteGenerator
from jalign.serve.triton import ServeError
from tests.conftest import CPU_XLA_FLAGS, ROOT, launch_job, quiet
from tests.serve.servers import config_args, free_port_block, kill_server_while_training, start_server

pytestmark = pytest.mark.many_steps


@pytest.fixture(scope="module")
def server(tmp_path_factory, reward_run, sft_run):
  """A generation server of the tiny SFT policy (a reinforce config's, generation alone); yields
  ``(address, its config overrides, its output lines)``."""
  address = f"127.0.0.1:{free_port_block()}"
  values = {"run_dir": str(tmp_path_factory.mktemp("engine") / "server"), "model.init": f"run:{sft_run}",
            "reinforce.reward_model": f"run:{reward_run}", "generation.serve": True,
            "generation.serve_address": address}
  process, lines = start_server(values, config="reinforce_tiny")
  try:
    yield address, values, lines
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(60)
    except subprocess.TimeoutExpired:
      process.kill()
  assert process.returncode == 0, "".join(lines[-40:])


def actor_settings(algorithm, address, reward_run, sft_run, **more) -> dict:
  """An actor's overrides: two rollouts of two steps each (ppo: an in-process critic), several refit
  buckets (the tiny model's weights in buckets of 256 KiB)."""
  common = {"model.init": f"run:{sft_run}", "rollout.max_new_tokens": 12, "train.global_batch_size": 8,
            "train.micro_batch_size": 1, "train.max_steps": 4, "train.save_interval": 0,
            "train.val_check_interval": 0, "rollout.engine_server": address, "rollout.refit_bucket_mb": 0.25}
  if algorithm == "ppo":
    return {**common, "critic.init": f"run:{reward_run}", "critic.reward_model": f"run:{reward_run}",
            "rollout.num_prompts": 16, "rollout.micro_batch_size": 16, "critic.global_batch_size": 8,
            "critic.micro_batch_size": 1, **more}
  if algorithm == "grpo":  # rewards from functions: the responses' lengths, and the math verifier
    return {**common, "grpo.reward_functions": "tests.rewards.sample_functions:length*0.1,"
            "jalign.rewards.math_answers:final_answer", "data.max_seq_length": 80, "rollout.num_prompts": 4,
            "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 16, **more}
  return {**common, "reinforce.reward_model": f"run:{reward_run}", "rollout.num_prompts": 4,
          "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 16, **more}


def _engine_run(algorithm, c):
  """A rollout algorithm's run of ``c``: its losses, each rollout's samples and rollout metrics, and its
  rollouts (their engine as the run left it)."""
  build = {"reinforce": reinforce.build, "ppo": ppo.build, "grpo": grpo.build}[algorithm]
  loop, rollouts_ = build(c, log=quiet)[:2]
  sampled, make = [], rollouts_.rollout

  def rollout():
    batches = make()
    sampled.append(rollouts_.last["tokens"])
    return batches
  rollouts_.rollout = rollout
  loop.run()
  logged = [json.loads(line) for line in open(os.path.join(c.run_dir, "metrics.jsonl"))]
  return loop.losses, sampled, [r for r in logged if r["split"] == "rollout"], rollouts_


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo", "grpo"])
def test_the_served_engine_samples_and_trains_as_the_local_one(server, tmp_path, reward_run, sft_run, algorithm):
  """The module's server as the rollout engine refitted from this process at every rollout: the same
  samples and losses as the local engine, each rollout recording the weights' version that made it,
  and after a refit the server's greedy tokens are the new weights' own."""
  address, _, _ = server
  settings = actor_settings(algorithm, address, reward_run, sft_run)
  runs = {}
  for engine in ("local", "served"):
    c = load_config_file(ROOT / "configs" / f"{algorithm}_tiny.py",
                         {**settings, "run_dir": str(tmp_path / engine), "rollout.engine": engine})
    runs[engine] = _engine_run(algorithm, c)
  (local_losses, local_samples, local_rows, _), (losses, samples, rows, rollouts_) = runs["local"], runs["served"]
  assert sorted(losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [local_losses[s] for s in sorted(losses)],
                             rtol=0, atol=1e-6)
  assert len(samples) == 2 and all(np.array_equal(a, b) for a, b in zip(samples, local_samples))
  assert [r["weight_version"] for r in rows] == [r["weight_version"] for r in local_rows] == [0, 2]
  assert rows[1]["refit_s"] > 0
  # Refitted to the trained weights: the server's greedy replies are those of the weights in this process.
  engine = rollouts_.engine_ready()
  assert engine.version == 4
  local = engine_lib.LocalEngine(rollouts_.c, rollouts_.loop.graphdef, rollouts_.mesh, rollouts_.rules,
                                 rollouts_.generation_rules)
  local.update_weights(4, (rollouts_.loop.state.params, rollouts_.loop.state.rest))
  request = Request(max_new_tokens=10, greedy=True, stop_ids=rollouts_.stop_ids, rows=8,
                    prompt_width=rollouts_.width)
  prompts = rollouts_.prompts[:8]
  assert engine.generate(prompts, request).responses == local.generate(prompts, request).responses


# An actor that hands its generation server the first bucket of a refit (weights changed by +0.5) and
# then stops answering: the test kills it while the server waits for the second.
_HALF_REFIT = """
import json, sys
import jax, jax.numpy as jnp
from jalign.config import load_config_file
from jalign.recipes.generation import GenerationJob
from jalign.rollout import refit
from jalign.serve.generation import RemoteGenerator
from jalign.serve.triton import ServeError

config, values, address = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
job = GenerationJob(load_config_file(config, values), log=lambda *a, **k: None)
shift = lambda x: jax.jit(lambda y: y + 0.5, out_shardings=x.sharding)(x)
state = jax.tree_util.tree_unflatten(job.treedef, [shift(x) for x in job.weights])

class FirstBucketOnly:
  def __init__(self, server):
    self.server, self.offered = server, 0
  def await_pull(self, uuid, arrays):
    if not self.offered:
      self.server.await_pull(uuid, arrays)
    self.offered += 1

offer = refit.Offer(address)
offer.server = FirstBucketOnly(offer.server)
manifest = offer.offer(state, 999, 1 << 16)
print("offered", len(manifest["buckets"]), flush=True)
RemoteGenerator(address).refit(manifest, timeout_s=120)
"""


def test_a_refit_cut_off_midway_leaves_the_server_serving_the_weights_it_had(server):
  address, values, output = server
  remote = RemoteGenerator(address)
  c = load_config_file(ROOT / "configs" / "reinforce_tiny.py", values)
  tok = build_tokenizer(c, build_model(c)[1])
  prompts = [tok.encode(t, add_special_tokens=c.data.add_bos) for t in ("Name a colour.", "Hi", "Count to three.")]
  request = Request(max_new_tokens=8, greedy=True, rows=8)
  before = remote.rollout(prompts, request)
  # A manifest that does not fit the served model is refused before anything moves.
  job_weights = [dict(w) for w in refit.describe(jax.tree_util.tree_flatten_with_path(
      {"w": jax.numpy.zeros((3, 5))})[0])]
  with pytest.raises(ServeError, match=r"refit to version 7 failed: the actor sends 1 weights, this server's model "
                                       rf"has \d+; serving version {before.version}"):
    remote.refit({"version": 7, "address": "127.0.0.1:1", "weights": job_weights, "mesh": {}, "buckets": []},
                 timeout_s=5)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {CPU_XLA_FLAGS}")
  actor = subprocess.Popen([sys.executable, "-c", _HALF_REFIT, str(ROOT / "configs" / "reinforce_tiny.py"),
                            json.dumps(values), address], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    line = actor.stdout.readline()
    assert line.startswith("offered "), line + actor.stdout.read()[-3000:]
    assert int(line.split()[1]) > 2
    time.sleep(3)  # the server has the first bucket and waits for the second
  finally:
    actor.kill()
    actor.wait()
  after = remote.rollout(prompts, request)
  said = [line for line in output if line.startswith("refit to version 999 failed")]
  assert len(said) == 1 and re.fullmatch(r"refit to version 999 failed: a pull failed \(.*Connection closed.*\); "
                                         rf"serving version {before.version}\n", said[0]), output[-10:]
  assert after.version == before.version != 999
  assert after.responses == before.responses
  np.testing.assert_array_equal(np.concatenate(after.logprobs), np.concatenate(before.logprobs))


def test_with_max_staleness_one_the_next_rollout_generates_while_the_actor_trains(server, tmp_path, reward_run,
                                                                                  sft_run):
  """PPO with one step per rollout: rollout k+1 is sampled by the weights of rollout k's start while
  those train (versions 0, 0, 1 at steps 0, 1, 2), and the importance ratio divides by the engine's
  log-probs, the behaviour policy's."""
  address, _, _ = server
  c = load_config_file(ROOT / "configs" / "ppo_tiny.py", {
      **actor_settings("ppo", address, reward_run, sft_run, **{"rollout.num_prompts": 8, "train.max_steps": 3}),
      "run_dir": str(tmp_path / "stale"), "rollout.engine": "served", "rollout.max_staleness": 1,
      # replies long enough to end (only those train the actor) and steps that move the log-probs visibly
      "rollout.max_new_tokens": 32, "optimizer.lr": 1e-3, "optimizer.warmup_steps": 0})
  loop, rollouts_ = ppo.build(c, log=quiet)
  generated_by, prepared, make = [], [], rollouts_._samples_of

  def samples_of(index):  # in the background, while the trainer's step counter moves on
    out = make(index)
    generated_by.append((index, out[3]))
    return out
  rollouts_._samples_of = samples_of
  prepare = rollouts_.prepare

  def recording(rollouts, batch, stats, step):
    out = prepare(rollouts, batch, stats, step)
    prepared.append({key: np.array(out[key]) for key in ("old_logprobs", "engine_logprobs", "mask", "loss_mask")})
    return out
  rollouts_.prepare = recording
  loop.run()
  rollouts_._settle()  # the rollout after the last, left generating
  rows = [json.loads(line) for line in open(tmp_path / "stale" / "metrics.jsonl")]
  rollout_rows = [r for r in rows if r["split"] == "rollout"]
  assert [(r["step"], r["weight_version"]) for r in rollout_rows] == [(0, 0), (1, 0), (2, 1)]
  assert generated_by[:2] == [(1, 0), (2, 1)]  # rollouts 1 and 2 came from the background
  for batch in prepared:
    on = batch["loss_mask"] > 0
    np.testing.assert_array_equal(batch["old_logprobs"][on], batch["engine_logprobs"][on])
  # Rollout 1 was sampled by version 0 and trained at version 1: the trainer's log-probs of its tokens
  # differ from the behaviour policy's, which the ratio used.
  assert rollout_rows[1]["logprob_gap_max"] > 1e-3, [(r["logprob_gap_max"], r["fraction_ended"]) for r in rollout_rows]


def test_an_actor_whose_engine_server_dies_stops_within_seconds_naming_it(tmp_path, reward_run, sft_run):
  """kill -9 of the generation server while a REINFORCE actor trains with it as its engine: the actor
  ends within 30 s with one line naming the server, its finished checkpoints as they were, and nothing
  of the server left listening."""
  port = free_port_block()
  address = f"127.0.0.1:{port}"
  server_process, _ = start_server({"run_dir": str(tmp_path / "server"), "model.init": f"run:{sft_run}",
                                    "reinforce.reward_model": f"run:{reward_run}", "generation.serve": True,
                                    "generation.serve_address": address}, config="reinforce_tiny")
  values = {**actor_settings("reinforce", address, reward_run, sft_run), "run_dir": str(tmp_path / "rf"),
            "rollout.engine": "served", "train.max_steps": 200, "train.save_interval": 2, "train.keep_last": 100}
  (actor,) = launch_job("jalign.train", config_args(values, "reinforce_tiny"), 1, 8, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
  err = kill_server_while_training(server_process, actor, tmp_path / "rf" / "checkpoints", port)
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: generation server http://{address}: stopped answering during "), err[-3000:]
