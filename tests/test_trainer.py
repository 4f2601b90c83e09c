"""The training loop: SFT learns, resume is exact, checkpoints survive crashes, NaNs and signals stop cleanly."""

import importlib.util
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jalign import optim, trainer
from jalign.losses import sft
from jalign.models import LlamaConfig, Transformer
from jalign.recipes.build import build_trainer
from jalign.train import run

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(run_dir, **train):
  spec = importlib.util.spec_from_file_location("sft_tiny", ROOT / "configs" / "sft_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.run_dir = str(run_dir)
  c.data.max_seq_length = 64
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 1  # per data-parallel rank: the tests see 8 CPU devices
  c.train.val_check_interval = 0
  c.train.save_interval = 0
  c.train.log_every = 1000
  for k, v in train.items():
    c.train[k] = v
  return c


def quiet(*_):
  pass


@pytest.mark.many_steps
def test_sft_loss_falls_well_below_its_start(tmp_path):
  c = tiny_config(tmp_path / "run", max_steps=60, val_check_interval=30)
  summary = run(c, log=quiet)
  losses = summary["losses"]
  assert losses[60] < 0.35 * losses[1], (losses[1], losses[60])
  assert summary["val"]["val_loss"] < 0.5 * losses[1]
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 62 and '"tokens_per_s"' in lines[0] and '"grad_norm"' in lines[0]
  assert any(p.name.startswith("events") for p in (tmp_path / "run" / "tensorboard").iterdir())
  assert (tmp_path / "run" / "config.json").is_file()


class SigtermAt:
  """Batches that deliver SIGTERM to this process when batch ``n`` is asked for."""

  def __init__(self, inner, n):
    self.inner, self.n, self.count = inner, n, 0

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


@pytest.mark.many_steps
def test_resume_after_sigterm_repeats_the_uninterrupted_losses(tmp_path):
  steps = 8
  straight = run(tiny_config(tmp_path / "a", max_steps=steps), log=quiet)["losses"]

  loop = build_trainer(tiny_config(tmp_path / "b", max_steps=steps), log=quiet)
  loop.train_batches = SigtermAt(loop.train_batches, 4)
  first = loop.run()
  assert first["stopped"] == "SIGTERM" and first["steps"] == 4 and first["last_checkpoint"] == 4

  loop = build_trainer(tiny_config(tmp_path / "b", max_steps=steps), log=quiet)
  second = loop.run()
  assert second["steps"] == steps and sorted(loop.losses) == list(range(5, steps + 1))
  for step in range(5, steps + 1):
    assert abs(loop.losses[step] - straight[step]) <= 1e-6 * abs(straight[step]), step


class HungAt(SigtermAt):
  """Batches of which batch ``n`` never comes (a step waiting on a hung server), while SIGTERM is
  delivered twice from another thread."""

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      for delay in (0.3, 0.6):
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
      time.sleep(60)
    return next(self.inner)


def test_a_second_sigterm_stops_a_step_that_waits_naming_the_last_checkpoint(tmp_path):
  loop = build_trainer(tiny_config(tmp_path / "run", max_steps=8, save_interval=2), log=quiet)
  loop.train_batches = HungAt(loop.train_batches, 4)
  began = time.monotonic()
  with pytest.raises(trainer.TrainingError) as stopped:
    loop.run()
  assert time.monotonic() - began < 30
  ckpt = tmp_path / "run" / "checkpoints"
  assert str(stopped.value) == f"a second SIGTERM stopped step 4 midway; the last checkpoint is step 2 in {ckpt}"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2"]
  assert signal.getsignal(signal.SIGTERM) != loop._on_signal  # the handler from before the run is back


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
  c = tiny_config(tmp_path / "run", max_steps=4, save_interval=2)
  done = run(c, log=quiet)
  ckpt = tmp_path / "run" / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
  # A save of step 6 killed halfway: its temporary folder holds part of the files.
  partial = ckpt / "6.orbax-checkpoint-tmp"
  shutil.copytree(ckpt / "4", partial)
  for f in sorted(partial.rglob("*"))[::2]:
    if f.is_file():
      f.unlink()
  loop = build_trainer(tiny_config(tmp_path / "run", max_steps=6, save_interval=2), log=quiet)
  assert loop.restore() == 4
  restored = jax.tree.leaves(loop.state.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in restored)
  assert not partial.exists()  # the torn save is cleaned up, never mistaken for a checkpoint
  assert done["last_checkpoint"] == 4


def test_time_limit_saves_and_stops(tmp_path):
  summary = run(tiny_config(tmp_path / "run", max_steps=50, max_time_s=1e-9), log=quiet)
  assert summary["stopped"] == "time limit" and summary["steps"] == 1 and summary["last_checkpoint"] == 1


# -- the pure step ------------------------------------------------------------------------------


def _batch(seed=0, rows=8, length=16):
  r = np.random.RandomState(seed)
  tokens = r.randint(3, 512, (rows, length)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": (r.rand(rows, length) > 0.3).astype(np.float32)}


def test_micro_batches_do_not_change_the_step():
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  tx = optax.sgd(1.0)  # the update is the gradient itself (Adam's first step would hide differences)
  graphdef, state = trainer.init_state(model, tx)
  batch = _batch()
  outs = []
  for micro in (1, 4):
    step = jax.jit(trainer.make_train_step(graphdef, sft.loss, tx, micro_batches=micro))
    new, metrics = step(state, batch)
    outs.append((metrics, new.params))
  assert abs(float(outs[0][0]["loss"]) - float(outs[1][0]["loss"])) < 1e-6
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  tx = optax.adam(1e-3)
  graphdef, state = trainer.init_state(model, tx)

  def poisoned(model, batch, rng):
    total, weight, sums = sft.loss(model, batch, rng)
    return total * batch["scale"][0], weight, sums

  batches = iter([dict(_batch(i), scale=np.full((8,), np.nan if i == 3 else 1.0, np.float32)) for i in range(6)])
  loop = trainer.Trainer(state=state, train_step=trainer.make_train_step(graphdef, poisoned, tx),
                         eval_step=trainer.make_eval_step(graphdef, poisoned), train_batches=batches,
                         run_dir=tmp_path, options=trainer.TrainerOptions(max_steps=6, save_interval=2,
                                                                          keep_best=0, log_every=100))
  with pytest.raises(trainer.TrainingError, match=r"step 4: loss is nan.*last good checkpoint is step 2"):
    loop.run()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def nemo_cosine_annealing(step, *, lr, min_lr, warmup, constant, max_steps):
  """NeMo's CosineAnnealing in float64: linear warmup, cosine to min_lr, then constant."""
  decay = max(1, max_steps - warmup - constant)
  if step < warmup:
    return lr * step / warmup
  if step >= warmup + decay:
    return min_lr
  return min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * (step - warmup) / decay))


@pytest.mark.parametrize("lr,min_lr,warmup,constant,max_steps", [(1.0, 0.1, 10, 20, 110), (3e-4, 3e-5, 0, 0, 7)])
def test_nemo_schedule_follows_cosine_annealing(lr, min_lr, warmup, constant, max_steps):
  s = optim.nemo_schedule(lr, max_steps=max_steps, warmup_steps=warmup, constant_steps=constant, min_lr=min_lr)
  steps = np.arange(max_steps + 5)
  want = [nemo_cosine_annealing(int(t), lr=lr, min_lr=min_lr, warmup=warmup, constant=constant, max_steps=max_steps)
          for t in steps]
  np.testing.assert_allclose(np.asarray(jax.vmap(s)(steps)), want, rtol=1e-6, atol=1e-7 * lr)


def test_adamw_is_optax_adamw_at_the_rate_of_the_schedule_it_is_given():
  params = {"embed": jnp.arange(6.0).reshape(2, 3), "final_norm": {"scale": jnp.ones(3)}, "q_bias": jnp.ones(3)}
  s = optim.nemo_schedule(0.5, max_steps=6, warmup_steps=2, min_lr=0.05)
  mask = lambda p: jax.tree_util.tree_map_with_path(optim._decays, p)
  reference = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(lambda t: float(s(t)), b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.5, mask=mask))
  tx = optim.adamw(weight_decay=0.5)
  ours, theirs = tx.init(params), reference.init(params)
  # The same state as optax's: checkpoints of either read alike.
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for t in range(4):
    grads = jax.tree.map(lambda p: jnp.sin(p + t), params)
    got, ours = tx.update(grads, ours, params, schedule=s)
    want, theirs = reference.update(grads, theirs, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got, want)
  # No weight decay on norm scales and biases: a zero rate's decoupled decay moves nothing, nor do zero
  # gradients on the undecayed.
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                         schedule=optim.constant_schedule(0.0))
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                         schedule=optim.constant_schedule(1.0))
  assert float(jnp.abs(updates["embed"]).max()) > 0 and float(jnp.abs(updates["q_bias"]).max()) == 0.0


def test_runs_that_differ_in_rates_and_lengths_compile_one_step():
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  tx = optim.adamw()
  step = jax.jit(trainer.make_train_step(nnx.graphdef(model), sft.loss, tx))
  batch = {"tokens": np.ones((2, 8), np.int32), "targets": np.ones((2, 8), np.int32),
           "loss_mask": np.ones((2, 8), np.float32), "segment_ids": np.ones((2, 8), np.int32),
           "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1))}
  programs = set()
  for lr, max_steps in [(1e-4, 10), (3e-3, 500)]:
    _, state = trainer.init_state(model, tx, schedule=optim.nemo_schedule(lr, max_steps=max_steps))
    programs.add(step.lower(state, batch).as_text())
    _, metrics = step(state, batch)
    assert float(metrics["lr"]) == 0.0  # the first of ten warm-up steps
  assert len(programs) == 1


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
  c = tiny_config(tmp_path / "run", max_steps=6)
  c.model.dtype = "bfloat16"
  c.data.pad_to_multiple_of = 16
  loop = build_trainer(c, log=quiet)
  summary = loop.run()
  assert summary["steps"] == 6 and np.isfinite(list(loop.losses.values())).all()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loop.state.params))


def test_a_validator_with_a_reward_keeps_the_highest_checkpoint(tmp_path):
  """``validator`` replaces the validation loss; ``monitor_higher_is_better`` keeps the best by maximum."""
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  tx = optax.adam(1e-3)
  graphdef, state = trainer.init_state(model, tx)
  rewards = iter([0.2, 0.9, 0.5, 0.1])  # at steps 1, 2, 3, 4
  loop = trainer.Trainer(
      state=state, train_step=trainer.make_train_step(graphdef, sft.loss, tx),
      eval_step=trainer.make_eval_step(graphdef, sft.loss), train_batches=iter([_batch(i) for i in range(4)]),
      run_dir=tmp_path, validator=lambda: {"val_reward": next(rewards)},
      options=trainer.TrainerOptions(max_steps=4, val_check_interval=1, save_interval=1, keep_last=1, keep_best=1,
                                     monitor="val_reward", monitor_higher_is_better=True, log_every=100))
  summary = loop.run()
  assert summary["val"] == {"val_reward": 0.1}
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]  # the best and the last


def _tensorboard_events(folder):
  """Every event of the TensorBoard files in ``folder`` (TFRecord framing: length, its CRC, the record, its CRC)."""
  import struct

  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(Path(folder).glob("events*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_a_resume_logs_each_step_once_and_marks_where_it_resumed(tmp_path):
  import json
  run(tiny_config(tmp_path / "run", max_steps=4, save_interval=2), log=quiet)
  # Killed after logging steps 3 and 4, before checkpoint 4 was complete: the resume repeats them.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  before = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  run(tiny_config(tmp_path / "run", max_steps=5, save_interval=2), log=quiet)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "resume"), (3, "train"),
                                                      (4, "train"), (5, "train")]
  assert [json.loads(line) for line in before[:2]] == rows[:2]  # what came before the checkpoint is kept
  purges = [e.step for e in _tensorboard_events(tmp_path / "run" / "tensorboard")
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]
  assert purges == [3]  # TensorBoard drops the first run's steps 3 and 4


def test_metrics_are_written_to_tensorboard_without_importing_torch(tmp_path):
  import subprocess
  import sys
  code = ("import sys, pathlib; from jalign.metrics import MetricsWriter\n"
          f"w = MetricsWriter(pathlib.Path({str(tmp_path)!r})); w.start(); w.write(1, {{'loss': 2.5}}); w.close()\n"
          "print('torch' in sys.modules); import torch; print(torch.tensor([1]).item())\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "1"]  # torch was not imported for TensorBoard, and imports after
  scalars = [(e.step, v.tag, v.simple_value) for e in _tensorboard_events(tmp_path / "tensorboard")
             for v in e.summary.value]
  assert scalars == [(1, "train/loss", 2.5)]


def test_a_metrics_file_that_cannot_be_written_is_one_error_naming_it(tmp_path):
  from jalign.metrics import MetricsError, MetricsWriter
  (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: No space left on device
  writer = MetricsWriter(tmp_path)
  writer.start()
  with pytest.raises(MetricsError) as error:
    writer.write(1, {"loss": 2.5})
  assert str(error.value) == f"{tmp_path / 'metrics.jsonl'} could not be written: No space left on device"
  with pytest.raises(MetricsError, match="metrics.jsonl could not be written"):  # the line it still holds
    writer.close()
  writer.close()  # closed: nothing is left to fail
