"""The critic server (NeMo-Aligner's ``serve_ppo_critic.py``, critic and reward model combined) and its
client, ``RemoteCritic``, which PPO's actor uses in place of the in-process ``jalign.recipes.critic.Critic``.

Endpoints (NeMo-Aligner's critic server protocol), HTTP, int64 tokens, float32 numbers:
  ``critic_infer``   tokens [B,S], sequence_lengths [B,1] -> values [B,S] (per token), rewards [B,1]
  ``reward_model``   tokens [B,S], sequence_lengths [B,1] -> rewards [B,1]
  ``critic_train``   tokens [N,S], returns, prev_values, mask [N,S-1] -> loss_mean [1]; one epoch, rows
                     padded to a multiple of critic.global_batch_size with mask 0
  ``critic_save``    dummy_var [1] (jalign sends the actor's step there), monitor [1] optional -> status
  ``critic_restore`` step [1] -> status (jalign's: the actor resumes, and the critic with it)
Values and returns are in the log-prob layout (column t: after tokens[:t+1]); the server pads each
request to ``data.max_seq_length`` columns so that one compiled shape serves every request, and calls
are served one at a time.
"""

from __future__ import annotations

import concurrent.futures
import threading

import jax
import numpy as np

from jalign.data.sft import Example
from jalign.parallel import distributed
from jalign.serve import triton as triton_lib
from jalign.specs.base import ConfigError
from jalign.trainer import TrainingError

MODELS = ("critic_infer", "reward_model", "critic_train", "critic_save", "critic_restore")


def _rows(tokens: np.ndarray, lengths: np.ndarray, width: int, multiple: int) -> dict:
  """Rows of ``width`` columns for the critic, padded up to a multiple of ``multiple`` rows."""
  b, s = tokens.shape
  if s > width:
    raise ValueError(f"requests of {s} tokens; this critic reads up to data.max_seq_length {width}")
  padded = -(-b // multiple) * multiple
  rows = np.zeros((padded, width), np.int32)
  rows[:b, :s] = tokens
  full_lengths = np.ones(padded, np.int64)
  full_lengths[:b] = lengths
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (padded, width)).copy()
  return {"tokens": rows, "positions": positions, "segment_ids": (positions < full_lengths[:, None]).astype(np.int32)}


def _examples(tokens, lengths) -> list[Example]:
  return [Example(np.asarray(t[:n]), np.zeros(int(n), bool)) for t, n in zip(tokens, lengths)]


def bind(triton, job, c, lock: threading.Lock | None = None):
  """Binds the critic endpoints of ``job`` (a ``jalign.recipes.critic.Critic``) to a started ``Triton``; ``lock``
  serialises calls with other models on the same server."""
  from pytriton.decorators import batch
  from pytriton.model_config import ModelConfig, Tensor

  width, size, monitor = c.data.max_seq_length, c.critic.global_batch_size, "val_reward"
  lock = lock or threading.Lock()  # one call at a time, as NeMo's server serialises them
  vocab, max_rows = job.vocab_size, c.critic.max_request_rows

  def check(tokens, lengths):
    triton_lib.check_tokens(tokens, vocab, max_rows=max_rows)
    if tokens.shape[1] > width:
      raise triton_lib.BadRequest(f"tokens: {tokens.shape[1]} columns; this critic reads up to data.max_seq_length {width}")
    triton_lib.check_lengths(lengths, tokens.shape[1])

  @batch
  def infer(tokens, sequence_lengths):
    lengths = sequence_lengths[:, 0]
    check(tokens, lengths)
    with lock:
      values = job.values(_rows(tokens, lengths, width, size))[:len(tokens), :tokens.shape[1]]
      rewards = job.rewards(_examples(tokens, lengths))
    return {"values": values.astype(np.float32), "rewards": rewards.astype(np.float32)[:, None]}

  @batch
  def reward_model(tokens, sequence_lengths):
    check(tokens, sequence_lengths[:, 0])
    with lock:
      rewards = job.rewards(_examples(tokens, sequence_lengths[:, 0]))
    return {"rewards": rewards.astype(np.float32)[:, None]}

  @triton_lib.each_request
  def train(tokens, returns, prev_values, mask):
    n, s = tokens.shape
    triton_lib.check_tokens(tokens, vocab, max_rows=max_rows)
    if s > width:
      raise triton_lib.BadRequest(f"tokens: {s} columns; this critic reads up to data.max_seq_length {width}")
    for name, value in (("returns", returns), ("prev_values", prev_values), ("mask", mask)):
      if value.shape != (n, s - 1) or not np.isfinite(value).all():
        raise triton_lib.BadRequest(f"{name}: expected finite numbers of shape {(n, s - 1)} (one per token after "
                                    f"the first), got shape {value.shape}")
    # The mask covers response tokens t in [p-1, L-2]: a row's length is its last masked column + 2.
    last = np.where(mask.any(axis=1), s - 1 - np.argmax(mask[:, ::-1] > 0, axis=1), s - 2)
    rows = _rows(tokens, np.minimum(last + 2, s), width, size)
    for key, value in (("returns", returns), ("old_values", prev_values), ("mask", mask)):
      rows[key] = np.zeros(rows["tokens"].shape, np.float32)
      rows[key][:n, :s - 1] = value
    with lock:
      metrics = job.train(rows)
    return {"loss_mean": np.asarray([metrics["critic_loss"]], np.float32)}

  @triton_lib.each_request
  def save(dummy_var, monitor_value=None):
    step = int(dummy_var.reshape(-1)[0])
    value = None if monitor_value is None else float(monitor_value.reshape(-1)[0])
    with lock:
      job.save(step, {monitor: value} if value is not None and np.isfinite(value) else None)
      job.wait()
    return {"status": np.asarray([step], np.int64)}

  @triton_lib.each_request
  def restore(step):
    step = int(step.reshape(-1)[0])
    with lock:
      job.restore(step)
    return {"status": np.asarray([step], np.int64)}

  dynamic = ModelConfig(max_batch_size=1 << 20)
  whole = ModelConfig(batching=False)
  lengths_in = [Tensor(name="tokens", dtype=np.int64, shape=(-1,)),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(1,))]
  rewards_out = Tensor(name="rewards", dtype=np.float32, shape=(1,))
  triton.bind(model_name="critic_infer", infer_func=infer, inputs=lengths_in,
              outputs=[Tensor(name="values", dtype=np.float32, shape=(-1,)), rewards_out], config=dynamic)
  triton.bind(model_name="reward_model", infer_func=reward_model, inputs=lengths_in, outputs=[rewards_out],
              config=dynamic)
  matrix = lambda name, dtype: Tensor(name=name, dtype=dtype, shape=(-1, -1))
  triton.bind(model_name="critic_train", infer_func=train,
              inputs=[matrix("tokens", np.int64), matrix("returns", np.float32), matrix("prev_values", np.float32),
                      matrix("mask", np.float32)],
              outputs=[Tensor(name="loss_mean", dtype=np.float32, shape=(1,))], config=whole)
  triton.bind(model_name="critic_save", infer_func=save,
              inputs=[Tensor(name="dummy_var", dtype=np.int64, shape=(1,)),
                      Tensor(name="monitor_value", dtype=np.float32, shape=(1,), optional=True)],
              outputs=[Tensor(name="status", dtype=np.int64, shape=(1,))], config=whole)
  triton.bind(model_name="critic_restore", infer_func=restore, inputs=[Tensor(name="step", dtype=np.int64, shape=(1,))],
              outputs=[Tensor(name="status", dtype=np.int64, shape=(1,))], config=whole)


class RemoteCritic:
  """The client of a critic server at ``address`` (``host:port``), with ``jalign.recipes.critic.Critic``'s
  interface; waits up to ``connect_timeout_s`` for the server's models to be ready, and up to ``timeout_s``
  for each answer of a server that is still alive (``triton.Client``).

  ``train_async`` sends an epoch of critic training and returns at once, as NeMo's actor does not
  await ``critic_train``: the critic trains while the actor does. Every other call first waits for it
  and hands its metrics to the ``report`` it was given, on the caller's thread.

  In an actor of several processes, process 0 alone talks to the server and every process gets its
  answers (or its error), so that each call reaches the server once.

  ``rewards`` asks ``critic_infer``, which answers the critic's values with the reward model's scores
  (NeMo's protocol); ``values`` of the same rows (the rollout's next call) takes those values, so that
  each rollout runs the reward model and the critic once.
  """

  def __init__(self, address: str, *, connect_timeout_s: float = 600.0, timeout_s: float = 1800.0, log=print):
    self._server = triton_lib.Client(address, timeout_s)  # and a dead server is noticed within seconds
    self.url = self._server.url
    self._pending = None  # (future, report) of a critic epoch in flight
    self._scored = None  # (tokens, lengths, values) of the last rows rewards() sent
    self._background = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic_train")
    _on_leader(lambda: self._connect(connect_timeout_s, log))

  def _connect(self, connect_timeout_s: float, log):
    if self._server.alive() is not None:  # not up yet: the critic job may still be loading its models
      log(f"waiting up to {connect_timeout_s:.0f} s (config.critic.connect_timeout_s) for the critic server at {self.url}")
    try:
      self._server.wait_for(MODELS, connect_timeout_s)
    except Exception as e:  # unreachable, or not a critic server
      raise ConfigError(f"config.critic.server: no critic server answers at {self.url} within "
                        f"{connect_timeout_s:.0f} s ({type(e).__name__}: {e}); start one with python -m jalign.serve "
                        "--config=<the same config>") from e

  def _call(self, name: str, batched: bool, **inputs) -> dict:
    try:
      return self._server.infer(name, batched=batched, **inputs)
    except triton_lib.ServerGone as e:  # the actor stops; its checkpoints are as the last save left them
      raise TrainingError(f"critic server {self.url}: {e}") from None
    except triton_lib.ServeError as e:  # a refused request or a failed call, in one line naming the server
      raise TrainingError(str(e)) from None

  def _settle(self):
    if self._pending is not None:
      future, report = self._pending
      self._pending = None
      report(future.result())

  def values(self, batch: dict) -> np.ndarray:
    return _on_leader(lambda: self._values(batch))

  def _values(self, batch: dict) -> np.ndarray:
    self._settle()
    tokens = np.asarray(batch["tokens"], np.int64)
    lengths = (np.asarray(batch["segment_ids"]) > 0).sum(axis=1)
    scored, self._scored = self._scored, None
    if scored is not None and _same_rows(scored[0], scored[1], tokens, lengths):
      values = np.zeros(tokens.shape, np.float32)  # past each row's end: the caller masks it
      values[:, :scored[2].shape[1]] = scored[2]
      return values
    return self._call("critic_infer", True, tokens=tokens, sequence_lengths=lengths[:, None].astype(np.int64))["values"]

  def rewards(self, examples) -> np.ndarray:
    return _on_leader(lambda: self._rewards(examples))

  def _rewards(self, examples) -> np.ndarray:
    self._settle()
    width = max(len(ex) for ex in examples)
    tokens = np.zeros((len(examples), width), np.int64)
    for i, ex in enumerate(examples):
      tokens[i, :len(ex)] = ex.tokens
    lengths = np.asarray([[len(ex)] for ex in examples], np.int64)
    out = self._call("critic_infer", True, tokens=tokens, sequence_lengths=lengths)
    self._scored = (tokens, lengths[:, 0], out["values"])
    return out["rewards"][:, 0]

  def train(self, batch: dict) -> dict:
    def call():
      self._settle()
      return self._train(batch)
    return _on_leader(call)

  def _train(self, batch: dict) -> dict:
    cut = lambda key: np.ascontiguousarray(np.asarray(batch[key], np.float32)[:, :-1])
    out = self._call("critic_train", False, tokens=np.asarray(batch["tokens"], np.int64), returns=cut("returns"),
                     prev_values=cut("old_values"), mask=cut("mask"))
    return {"critic_loss": float(out["loss_mean"][0])}

  def train_async(self, batch: dict, report):
    """``train(batch)`` in the background; ``report(metrics)`` is called by the next call that waits."""
    if _leader():
      self._settle()
      self._pending = (self._background.submit(self._train, batch), report)

  def save(self, step: int, metrics: dict | None = None):
    def call():
      self._settle()
      value = next(iter(metrics.values())) if metrics else float("nan")
      self._call("critic_save", False, dummy_var=np.asarray([step], np.int64),
                 monitor_value=np.asarray([value], np.float32))
    _on_leader(call)

  def restore(self, step: int):
    def call():
      self._settle()
      try:
        self._call("critic_restore", False, step=np.asarray([step], np.int64))
      except TrainingError as e:  # the server's error, e.g. no checkpoint at that step
        raise TrainingError(f"could not restore the critic's step {step}: {e}") from None
    _on_leader(call)

  def wait(self):
    _on_leader(self._settle)  # the server finishes each save before it answers


def _same_rows(tokens, lengths, other_tokens, other_lengths) -> bool:
  """Whether rows ``other_*`` (as wide or wider) hold the same sequences as ``tokens``, ``lengths``."""
  if tokens.shape[0] != other_tokens.shape[0] or tokens.shape[1] > other_tokens.shape[1]:
    return False
  if not np.array_equal(lengths, other_lengths):
    return False
  within = np.arange(tokens.shape[1])[None] < lengths[:, None]
  return bool(np.array_equal(np.where(within, tokens, 0), np.where(within, other_tokens[:, :tokens.shape[1]], 0)))


def _leader() -> bool:
  return jax.process_index() == 0


def _on_leader(fn):
  """``fn()`` on process 0 of the job; its result, or its error, on every process."""
  if jax.process_count() == 1:
    return fn()
  outcome = None
  if _leader():
    try:
      outcome = (True, fn())
    except (ConfigError, TrainingError) as e:
      outcome = (False, e)
    except Exception as e:  # noqa: BLE001 - sent to the other processes as a plain error
      outcome = (False, RuntimeError(f"{type(e).__name__}: {e}"))
  ok, value = distributed.broadcast_object(outcome)
  if not ok:
    raise value
  return value
