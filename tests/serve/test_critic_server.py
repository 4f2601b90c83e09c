"""The critic server: ``python -m jalign.serve`` in a process of its own on loopback, against the
in-process critic job it serves, and PPO trained through it with checkpoints and resume, from one actor
process and from two; the policy served for generation on the same server, against in-process
generation. (How a server job of several processes drives its followers: tests/parallel.)"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import trainer
from jalign.config import load_config_file
from jalign.recipes import critic as critic_lib
from jalign.recipes import ppo, reinforce, rollouts
from jalign.rollout import engine as engine_lib
from jalign.rollout import refit
from jalign.rollout.sampling import Request
from jalign.data.packing import build_row
from jalign.data.sft import Example
from jalign.rollout import generate
from jalign.serve.critic import RemoteCritic
from jalign.serve.generation import RemoteGenerator
from jalign.serve.triton import ServeError
from jalign.recipes.build import build_model, build_tokenizer
from jalign.train import run
from tests.conftest import CPU_XLA_FLAGS, ROOT, launch_job, run_job
from tests.conftest import quiet


def free_port_block(n=3) -> int:
  """A port p with p .. p+n-1 free on loopback (Triton takes HTTP, gRPC and metrics ports)."""
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port + n < 65536 and all(_free(port + i) for i in range(n)):
      return port
  raise RuntimeError("no free block of ports")


def _free(port) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
      return True
    except OSError:
      return False


def overrides(run_dir, reward_run, sft_run, address):
  return {"run_dir": str(run_dir), "model.init": f"run:{sft_run}", "critic.init": f"run:{reward_run}",
          "critic.reward_model": f"run:{reward_run}", "critic.serve_address": address,
          "rollout.num_prompts": 16, "rollout.micro_batch_size": 16, "rollout.max_new_tokens": 12,
          "train.global_batch_size": 8, "train.micro_batch_size": 1, "critic.global_batch_size": 8,
          "critic.micro_batch_size": 1, "train.max_steps": 4, "train.save_interval": 2,
          "train.val_check_interval": 2, "train.log_every": 1000, "generation.serve": True}


def ppo_args(values) -> list[str]:
  """Command-line arguments of ppo_tiny with the dotted-key ``values``."""
  return [f"--config={ROOT / 'configs' / 'ppo_tiny.py'}", *(f"--config.{key}={value}" for key, value in values.items())]


def start_server(values, lines=None):
  """``python -m jalign.serve`` of ppo_tiny with ``values``, once it serves: ``(process, its output lines)``
  (``lines``, when given, gets them)."""
  (process,) = launch_job("jalign.serve", ppo_args(values), 1, 8, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines, ready = ([] if lines is None else lines), threading.Event()

  def read():
    for line in process.stdout:
      lines.append(line)
      if line.startswith("serving "):
        ready.set()
  threading.Thread(target=read, daemon=True).start()
  deadline = time.monotonic() + 180
  while not ready.is_set() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  assert ready.is_set(), "".join(lines[-40:])
  return process, lines


SERVER_OUTPUT: list[str] = []  # the module server's lines


@pytest.fixture(scope="module")
def server(tmp_path_factory, reward_run, sft_run):
  """A critic server for a PPO run folder; yields (address, that run's config overrides)."""
  address = f"127.0.0.1:{free_port_block()}"
  values = overrides(tmp_path_factory.mktemp("served") / "ppo", reward_run, sft_run, address)
  SERVER_OUTPUT.clear()
  process, lines = start_server(values, SERVER_OUTPUT)
  try:
    yield address, values
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(60)
    except subprocess.TimeoutExpired:
      process.kill()
  assert process.returncode == 0, "".join(lines[-40:])


def rows(tokens_list, width):
  examples = [Example(np.asarray(t, np.int32), np.r_[np.zeros(3, bool), np.ones(len(t) - 3, bool)])
              for t in tokens_list]
  built = [build_row([ex], width, 0) for ex in examples]
  return examples, {key: np.stack([b[key] for b in built]) for key in built[0]}


def test_served_critic_computes_what_the_in_process_one_does(server):
  address, values = server
  c = load_config_file(ROOT / "configs" / "ppo_tiny.py", {**values, "run_dir": values["run_dir"] + "_local"})
  local = critic_lib.build(c, rollouts.trainer_options(c, True))
  remote = RemoteCritic(address)
  rng = np.random.default_rng(0)
  examples, batch = rows([rng.integers(3, 200, n) for n in rng.integers(8, 60, 8)], c.data.max_seq_length)
  mask = batch["loss_mask"]
  np.testing.assert_allclose(remote.values(batch) * mask, local.values(batch) * mask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(remote.rewards(examples), local.rewards(examples), rtol=1e-5, atol=1e-5)
  # A rollout scores its samples, then asks their values: one critic_infer answers both (NeMo's
  # protocol), so the reward model runs once per rollout.
  calls, infer = [], remote._server.infer
  remote._server.infer = lambda name, **kw: calls.append(name) or infer(name, **kw)
  np.testing.assert_allclose(remote.rewards(examples), local.rewards(examples), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(remote.values(batch) * mask, local.values(batch) * mask, rtol=1e-5, atol=1e-5)
  assert calls == ["critic_infer"]
  remote.values(batch)  # asked again, or for other rows: a call of its own
  assert calls == ["critic_infer", "critic_infer"]
  remote._server.infer = infer
  train_batch = {**{k: batch[k] for k in ("tokens", "positions", "segment_ids")}, "mask": mask,
                 "old_values": local.values(batch), "returns": rng.normal(size=mask.shape).astype(np.float32)}
  assert remote.train(train_batch)["critic_loss"] == pytest.approx(local.train(train_batch)["critic_loss"], rel=1e-4)
  # Both took the same optimizer step: their values agree still.
  np.testing.assert_allclose(remote.values(batch) * mask, local.values(batch) * mask, rtol=1e-4, atol=1e-4)
  # In the background (NeMo's unawaited critic_train): the next call waits for it and reports it first.
  reports = []
  remote.train_async(train_batch, reports.append)
  local_loss = local.train(train_batch)["critic_loss"]
  np.testing.assert_allclose(remote.values(batch) * mask, local.values(batch) * mask, rtol=1e-4, atol=1e-4)
  assert len(reports) == 1 and reports[0]["critic_loss"] == pytest.approx(local_loss, rel=1e-4)


def test_ppo_trains_through_the_server_and_resumes_with_it(server):
  address, values = server
  config = lambda **more: load_config_file(ROOT / "configs" / "ppo_tiny.py",
                                           {**values, "critic.server": address, **more})
  summary = run(config(), log=quiet)
  assert summary["steps"] == 4 and all(np.isfinite(list(summary["losses"].values())))
  folder = values["run_dir"]
  logged = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
  assert [r["step"] for r in logged if r["split"] == "critic"] == [0, 2]
  assert all(np.isfinite(r["critic_loss"]) for r in logged if r["split"] == "critic")
  # The server saved the critic at the actor's steps, in the run folder.
  actor = sorted(os.listdir(os.path.join(folder, "checkpoints")))
  assert sorted(os.listdir(os.path.join(folder, "critic", "checkpoints"))) == actor == ["2", "4"]
  summary = run(config(**{"train.max_steps": 6}), log=quiet)
  assert summary["steps"] == 6 and sorted(summary["losses"]) == [5, 6]
  # Resuming where the server has no critic checkpoint fails with the server's reason.
  shutil.rmtree(os.path.join(folder, "critic", "checkpoints", "6"))
  with pytest.raises(trainer.TrainingError, match="no critic checkpoint at step 6"):
    run(config(**{"train.max_steps": 8}), log=quiet)


def test_an_actor_of_two_processes_trains_through_the_server(server, tmp_path):
  """Process 0 of the actor alone calls the server and shares its answers, so the critic trains once per
  rollout and both processes train the actor on the same rollout."""
  address, values = server
  run_dir = tmp_path / "two"
  actor = {**values, "run_dir": run_dir, "critic.server": address, "train.max_steps": 2, "train.save_interval": 0,
           "train.val_check_interval": 0, "train.resume": False}
  run_job("jalign.train", ppo_args(actor), 2, 4)
  logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2]
  assert [r["step"] for r in logged if r["split"] == "critic"] == [0]  # one rollout of 16 = two steps of 8
  assert all(np.isfinite(r["loss"]) for r in logged if r["split"] == "train")
  assert np.isfinite([r["critic_loss"] for r in logged if r["split"] == "critic"]).all()


def test_served_policy_generates_what_it_does_in_process(server):
  address, values = server
  c = load_config_file(ROOT / "configs" / "ppo_tiny.py", values)
  model, own = build_model(c)
  tok = build_tokenizer(c, own)
  remote = RemoteGenerator(address)
  texts = ["What is the capital of France?", "Name a colour.", "Hi", "Count to three."]
  prompts = [tok.encode(t, add_special_tokens=c.data.add_bos) for t in texts]  # as the server encodes texts
  for settings in (dict(greedy=True), dict(temperature=0.9, top_k=20, seed=3), dict(top_p=0.8, min_new_tokens=4, seed=5)):
    served = remote.generate(prompts, max_new_tokens=10, **settings)
    local = generate(model, prompts, max_new_tokens=10, stop_ids=(tok.eos_id,), pad_id=tok.pad_id, **settings)
    assert served.responses() == local.responses(), settings
    assert sum(len(r) for r in served.responses()) > len(prompts)  # replies of several tokens
    np.testing.assert_array_equal(served.is_end, np.asarray(local.is_end))
    for b, p in enumerate(prompts):  # the server pads prompts wider: compare each response's log-probs
      n = int(served.lengths[b])
      np.testing.assert_allclose(served.logprobs[b, len(p):n], np.asarray(local.logprobs)[b, len(p):n], atol=1e-4)
  replies = remote.generate_text(texts, max_new_tokens=10, greedy=True, stop_ids=[tok.eos_id])
  local = generate(model, prompts, max_new_tokens=10, greedy=True, stop_ids=(tok.eos_id,), pad_id=tok.pad_id)
  assert replies == [tok.decode(r) for r in local.responses()]


def test_an_unreachable_server_is_a_config_error_after_the_wait_it_announces():
  said = []
  began = time.monotonic()
  with pytest.raises(config_lib.ConfigError, match=r"config.critic.server: no critic server answers at http://127.* within 2 s"):
    RemoteCritic(f"127.0.0.1:{free_port_block()}", connect_timeout_s=2, log=said.append)
  assert time.monotonic() - began < 20
  assert said and said[0].startswith("waiting up to 2 s (config.critic.connect_timeout_s) for the critic server at http://127")


def test_serve_names_what_it_cannot_serve(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jalign.serve", f"--config={ROOT / 'configs' / 'dpo_tiny.py'}",
                        f"--config.run_dir={tmp_path / 'dpo'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "config.algorithm: a dpo config names no server" in out.stderr


def test_bad_requests_get_one_line_answers_and_the_server_keeps_serving(server):
  from pytriton.client import ModelClient
  address, _ = server
  url = f"http://{address}"

  def answer(model, **inputs):
    with ModelClient(url, model, init_timeout_s=60, inference_timeout_s=60) as client:
      try:
        return client.infer_batch(**inputs) if model in ("critic_infer", "reward_model") else client.infer_sample(**inputs)
      except Exception as e:  # noqa: BLE001 - the server's answer
        return str(e)

  tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int64)
  lengths = np.array([[4], [3]], np.int64)
  cases = [
      ("critic_infer", dict(tokens=np.array([[5, 6, 999999999, 8]], np.int64), sequence_lengths=np.array([[4]], np.int64)),
       "tokens: id 999999999 at row 0, column 2 is outside the vocabulary of 512"),
      ("reward_model", dict(tokens=np.array([[5, -3, 7, 8]], np.int64), sequence_lengths=np.array([[4]], np.int64)),
       "tokens: id -3 at row 0, column 1 is outside the vocabulary of 512"),
      ("critic_infer", dict(tokens=tokens, sequence_lengths=np.array([[4], [-1]], np.int64)),
       "sequence_lengths: -1 at row 1 is not a length between 1 and the request's 4 columns"),
      ("reward_model", dict(tokens=tokens, sequence_lengths=np.array([[40], [3]], np.int64)),
       "sequence_lengths: 40 at row 0 is not a length between 1 and the request's 4 columns"),
      ("reward_model", dict(tokens=np.ones((4097, 4), np.int64), sequence_lengths=np.full((4097, 1), 4, np.int64)),
       "tokens: 4097 rows, more than the 4096 this server takes in one request"),
      ("generate", dict(tokens=np.array([[5, 6, 600]], np.int64), sequence_lengths=np.array([[3]], np.int64),
                        max_new_tokens=np.array([4], np.int64)),
       "tokens: id 600 at row 0, column 2 is outside the vocabulary of 512"),
      ("generate", dict(tokens=tokens, sequence_lengths=lengths, max_new_tokens=np.array([0], np.int64)),
       "need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens; got 0, 0"),
  ]
  for model, inputs, reason in cases:
    text = answer(model, **inputs)
    # Triton's Python backend wraps the server's one line in a few lines of its own stub's; nothing of
    # the server's code (no frame of jalign) is in the answer.
    assert isinstance(text, str) and f"jalign.serve.triton.BadRequest: {reason}\n" in text, repr(text)
    assert "jalign/" not in text, text
  # and it goes on serving
  good = answer("critic_infer", tokens=tokens, sequence_lengths=lengths)
  assert good["values"].shape == (2, 4) and np.isfinite(good["rewards"]).all()


def _checkpoint_files(folder) -> dict:
  return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_actor_whose_critic_server_dies_stops_within_seconds_naming_it(tmp_path, reward_run, sft_run):
  """kill -9 of the server while the actor trains through it: the actor ends within 30 s with one line
  naming the server, its finished checkpoints as they were, and nothing of the server left listening."""
  port = free_port_block()
  address = f"127.0.0.1:{port}"
  values = {**overrides(tmp_path / "ppo", reward_run, sft_run, address), "train.max_steps": 200,
            "train.save_interval": 2, "train.keep_last": 100, "train.val_check_interval": 0, "generation.serve": False}
  server_process, _ = start_server(values)
  (actor,) = launch_job("jalign.train", ppo_args({**values, "critic.server": address}), 1, 8,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  checkpoints = tmp_path / "ppo" / "checkpoints"
  try:
    deadline = time.monotonic() + 180
    while not (checkpoints / "4").is_dir() and actor.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert (checkpoints / "4").is_dir(), actor.communicate(timeout=60)[1][-3000:]
    saved = _checkpoint_files(checkpoints / "2")
    server_process.kill()
    killed = time.monotonic()
    _, err = actor.communicate(timeout=60)
    assert time.monotonic() - killed < 30
  finally:
    for p in (actor, server_process):
      if p.poll() is None:
        p.kill()
  assert actor.returncode == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: critic server http://{address}: stopped answering during "), err[-3000:]
  assert _checkpoint_files(checkpoints / "2") == saved
  deadline = time.monotonic() + 15  # Triton, the server's child, goes with it
  while any(_listening(port + i) for i in range(3)) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not any(_listening(port + i) for i in range(3))


def _listening(port) -> bool:
  with socket.socket() as s:
    try:
      s.connect(("127.0.0.1", port))
      return True
    except ConnectionRefusedError:
      return False


def _engine_run(algorithm, c):
  """A rollout algorithm's run of ``c``: its losses, each rollout's samples and rollout metrics, and its
  rollouts (their engine as the run left it)."""
  build = {"reinforce": reinforce.build, "ppo": ppo.build}[algorithm]
  loop, rollouts_ = build(c, log=quiet)
  sampled, make = [], rollouts_.rollout

  def rollout():
    batches = make()
    sampled.append(rollouts_.last["tokens"])
    return batches
  rollouts_.rollout = rollout
  loop.run()
  logged = [json.loads(line) for line in open(os.path.join(c.run_dir, "metrics.jsonl"))]
  return loop.losses, sampled, [r for r in logged if r["split"] == "rollout"], rollouts_


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
def test_the_served_engine_samples_and_trains_as_the_local_one(server, tmp_path, reward_run, sft_run, algorithm):
  """The module's server as a rollout engine refitted from this process at every rollout: the same
  samples and losses as the local engine, each rollout recording the weights' version that made it,
  and after a refit the server's greedy tokens are the new weights' own."""
  address, values = server
  common = {"train.max_steps": 4, "train.save_interval": 0, "train.val_check_interval": 0,
            "rollout.engine_server": address, "rollout.refit_bucket_mb": 0.25}  # tiny: several buckets
  if algorithm == "ppo":  # an in-process critic: the server is the engine only
    settings = {**values, **common, "generation.serve": False}
  else:
    settings = {"model.init": f"run:{sft_run}", "reinforce.reward_model": f"run:{reward_run}",
                "rollout.num_prompts": 4, "rollout.samples_per_prompt": 4, "rollout.micro_batch_size": 16,
                "rollout.max_new_tokens": 12, "train.global_batch_size": 8, "train.micro_batch_size": 1, **common}
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
  address, values = server
  remote = RemoteGenerator(address)
  c = load_config_file(ROOT / "configs" / "ppo_tiny.py", values)
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
  actor = subprocess.Popen([sys.executable, "-c", _HALF_REFIT, str(ROOT / "configs" / "ppo_tiny.py"),
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
  said = [line for line in SERVER_OUTPUT if line.startswith("refit to version 999 failed")]
  assert len(said) == 1 and re.fullmatch(r"refit to version 999 failed: a pull failed \(.*Connection closed.*\); "
                                         rf"serving version {before.version}\n", said[0]), SERVER_OUTPUT[-10:]
  assert after.version == before.version != 999
  assert after.responses == before.responses
  np.testing.assert_array_equal(np.concatenate(after.logprobs), np.concatenate(before.logprobs))
