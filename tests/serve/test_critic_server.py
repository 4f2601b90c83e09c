"""The critic server: ``python -m jalign.serve`` in a process of its own on loopback, against the
in-process critic job it serves, and PPO trained through it with checkpoints and resume, from one actor
process and from two; the policy served for generation on the same server, against in-process
generation. (How a server job of several processes drives its followers: tests/parallel; the
generation server as a rollout engine: test_served_engine.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jalign import config as config_lib
from jalign import trainer
from jalign.config import load_config_file
from jalign.recipes import critic as critic_lib
from jalign.recipes import rollouts
from jalign.data.packing import build_row
from jalign.data.sft import Example
from jalign.rollout import generate
from jalign.serve.critic import RemoteCritic
from jalign.serve.generation import RemoteGenerator
from jalign.recipes.build import build_model, build_tokenizer
from jalign.train import run
from tests.conftest import ROOT, launch_job, run_job
from tests.conftest import quiet
from tests.serve.servers import free_port_block, kill_server_while_training, ppo_args, start_server

pytestmark = pytest.mark.many_steps


def overrides(run_dir, reward_run, sft_run, address):
  return {"run_dir": str(run_dir), "model.init": f"run:{sft_run}", "critic.init": f"run:{reward_run}",
          "critic.reward_model": f"run:{reward_run}", "critic.serve_address": address,
          "rollout.num_prompts": 16, "rollout.micro_batch_size": 16, "rollout.max_new_tokens": 12,
          "train.global_batch_size": 8, "train.micro_batch_size": 1, "critic.global_batch_size": 8,
          "critic.micro_batch_size": 1, "train.max_steps": 4, "train.save_interval": 2,
          "train.val_check_interval": 2, "train.log_every": 1000, "generation.serve": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory, reward_run, sft_run):
  """A critic server for a PPO run folder; yields (address, that run's config overrides)."""
  address = f"127.0.0.1:{free_port_block()}"
  values = overrides(tmp_path_factory.mktemp("served") / "ppo", reward_run, sft_run, address)
  process, lines = start_server(values)
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
  err = kill_server_while_training(server_process, actor, tmp_path / "ppo" / "checkpoints", port)
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: critic server http://{address}: stopped answering during "), err[-3000:]
