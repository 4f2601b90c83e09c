"""Python reward functions named in a config, run in worker processes with a timeout per call.

A function is named ``module:function`` (optionally ``*weight``, default 1): ``jalign.rewards.math_answers:
final_answer``, ``my_rewards:unit_tests*0.5``. It is called as ``fn(prompt, response, record) -> float``
with the prompt and response as text and the data record (its ground truth, such as ``answer``).

Calls run in ``workers`` processes of their own (started with ``spawn``: no copy of the trainer's
process, and only the functions' modules imported, not the trainer's main module), so that a function
that hangs is stopped after ``timeout_s`` (its worker is killed and a fresh one started) and one that
crashes its process takes only its worker down. A call's time starts once its
worker has started and imported the functions (up to ``START_TIMEOUT_S``, a busy machine's start-up),
so that a slow start is never taken for a hanging call. A call that raises, times out
or returns anything but a finite number fails: with ``on_error="default"`` it scores ``default`` and is
counted and reported (``failures``), with ``"stop"`` the scoring raises ``RewardError`` naming the
function and the record's ``file:line``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import multiprocessing
import sys
import time
import types
from multiprocessing.connection import wait

ON_ERROR = ("default", "stop")
START_TIMEOUT_S = 300.0


class RewardError(RuntimeError):
  """A reward function that failed with ``on_error="stop"``, or one that cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class Named:
  name: str      # module:function
  weight: float


def parse(spec: str) -> Named:
  """``module:function[*weight]``."""
  name, _, weight = spec.strip().partition("*")
  module, _, function = name.partition(":")
  if not module or not function:
    raise RewardError(f"reward function {spec!r}: expected module:function, optionally followed by *weight")
  try:
    value = float(weight) if weight else 1.0
  except ValueError:
    raise RewardError(f"reward function {spec!r}: weight {weight!r} is not a number") from None
  return Named(name.strip(), value)


def load(name: str):
  """The function ``module:function`` names."""
  module, _, function = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module), function)
  except ImportError as e:
    raise RewardError(f"reward function {name}: cannot import {module} ({e})") from None
  except AttributeError:
    raise RewardError(f"reward function {name}: {module} has no {function}") from None
  if not callable(fn):
    raise RewardError(f"reward function {name}: not callable")
  return fn


def call(fn, prompt: str, response: str, record: dict) -> tuple[bool, object]:
  """``(True, value)`` for a finite number, else ``(False, what went wrong)``."""
  try:
    value = fn(prompt, response, record)
  except Exception as e:  # noqa: BLE001 - a user's function; reported by name and record
    return False, f"raised {type(e).__name__}: {e}"
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return False, f"returned {value!r}, not a finite number"
  return True, float(value)


@contextlib.contextmanager
def _spawned_without_main(names: list[str]):
  """A spawned process imports its parent's main module first: for ``python -m jalign.train`` that is
  jax and the whole trainer, seconds and about 200 MB per worker that a reward function never uses.
  While workers start, the parent's main is a bare module, unless a function lives in it."""
  if any(name.partition(":")[0] == "__main__" for name in names):
    yield
    return
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


def _worker(conn, names: list[str]) -> None:
  functions = [load(n) for n in names]
  conn.send("ready")
  while True:
    task = conn.recv()
    if task is None:
      return
    index, fn, prompt, response, record = task
    conn.send((index, *call(functions[fn], prompt, response, record)))


@dataclasses.dataclass
class Item:
  prompt: str
  response: str
  record: dict
  where: str  # the record's file:line


class RewardPool:
  """The weighted sum of ``functions`` (``Named``) over items, computed by ``workers`` processes."""

  def __init__(self, functions: list[Named], *, timeout_s: float = 10.0, on_error: str = "default",
               default: float = 0.0, workers: int = 2, log=print):
    if on_error not in ON_ERROR:
      raise RewardError(f"on_error {on_error!r}: one of {ON_ERROR}")
    self.functions, self.timeout_s, self.on_error, self.default = functions, timeout_s, on_error, default
    self.log = log
    self.names = [f.name for f in functions]
    for name in self.names:  # a misspelt name fails here, before any worker starts
      load(name)
    self._context = multiprocessing.get_context("spawn")
    self._workers = [None] * max(1, workers)
    self.failures = 0

  def _start(self, slots) -> None:
    """Starts a worker in each of ``slots`` (replacing one that died), all at once, and waits until each
    has imported the functions."""
    for slot in slots:
      if self._workers[slot] is not None:
        self._kill(slot)
      ours, theirs = self._context.Pipe()
      process = self._context.Process(target=_worker, args=(theirs, self.names), daemon=True,
                                      name=f"reward-worker-{slot}")
      with _spawned_without_main(self.names):
        process.start()
      theirs.close()
      self._workers[slot] = (process, ours)
    for slot in slots:
      conn = self._workers[slot][1]
      try:
        ready = conn.poll(START_TIMEOUT_S) and conn.recv() == "ready"
      except (EOFError, OSError):
        ready = False
      if not ready:
        self._kill(slot)
        raise RewardError(f"reward functions {', '.join(self.names)}: a worker process did not start within "
                          f"{START_TIMEOUT_S:g} s")

  def _kill(self, slot: int) -> None:
    process, conn = self._workers[slot]
    process.kill()
    process.join()
    conn.close()
    self._workers[slot] = None

  def score(self, items: list[Item]) -> tuple[list[float], dict]:
    """The weighted reward of each item, and ``{function name: [its values]}``."""
    tasks = [(i, f) for i in range(len(items)) for f in range(len(self.functions))]
    values = [[self.default] * len(items) for _ in self.functions]
    failed: list[str] = []
    pending = list(reversed(tasks))
    running = {}  # slot -> (task, deadline)
    while pending or running:
      idle = [slot for slot in range(len(self._workers)) if slot not in running][:len(pending)]
      self._start([slot for slot in idle if self._workers[slot] is None or not self._workers[slot][0].is_alive()])
      for slot in idle:
        task = pending.pop()
        item = items[task[0]]
        self._workers[slot][1].send((task[0], task[1], item.prompt, item.response, item.record))
        running[slot] = (task, time.monotonic() + self.timeout_s)
      conns = {self._workers[s][1]: s for s in running}
      nearest = min(deadline for _, deadline in running.values())
      ready = wait(list(conns), timeout=max(0.0, nearest - time.monotonic()))
      for conn in ready:
        slot = conns[conn]
        (i, f), _ = running.pop(slot)
        try:
          _, ok, value = conn.recv()
        except (EOFError, OSError):  # the worker died mid-call (a crash in native code, os._exit)
          self._kill(slot)
          ok, value = False, "ended its worker process"
        self._settle(i, f, ok, value, items, values, failed)
      now = time.monotonic()
      for slot, ((i, f), deadline) in list(running.items()):
        if now >= deadline:
          running.pop(slot)
          self._kill(slot)
          self._settle(i, f, False, f"timed out after {self.timeout_s:g} s", items, values, failed)
    if failed:
      self.failures += len(failed)
      self.log(f"{len(failed)} reward function calls failed and scored {self.default:g}; first: {failed[0]}")
    totals = [sum(fn.weight * values[f][i] for f, fn in enumerate(self.functions)) for i in range(len(items))]
    return totals, {name: column for name, column in zip(self.names, values)}

  def _settle(self, i, f, ok, value, items, values, failed) -> None:
    if ok:
      values[f][i] = value
      return
    message = f"reward function {self.names[f]} {value} on {items[i].where}"
    if self.on_error == "stop":
      self.close()
      raise RewardError(message)
    failed.append(message)

  def close(self) -> None:
    for slot, worker in enumerate(self._workers):
      if worker is not None:
        process, conn = worker
        if process.is_alive():
          try:
            conn.send(None)
          except OSError:
            pass
          process.join(timeout=2)
        self._kill(slot)
