"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

Call ``initialize`` before anything touches a JAX device. An explicit coordinator address (with
the number of processes and this process's id) wins; otherwise a Slurm or Open MPI job with more
than one task, or ``JAX_COORDINATOR_ADDRESS`` in the environment, lets JAX find its peers itself.
A single process needs nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

import jax


def _launched_by_a_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "JAX_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               local_device_count: int = 0, timeout_s: int = 300) -> bool:
  """Join the job's processes; returns True when this is a multi-process run."""
  if local_device_count:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"with coordinator_address {coordinator_address!r}, num_processes ({num_processes}) and "
                       f"process_id ({process_id}) must describe this process")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True
  if _launched_by_a_cluster():
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False


# The coordination service's key under which the first process of a job to fail leaves its error.
FAILURE_KEY = "jalign/failure"
_ending = threading.Event()


def _client():
  from jax._src import distributed as jax_distributed  # the coordination service's client (no public handle)
  return jax_distributed.global_state.client


def end_job(message: str, code: int = 1):
  """Ends this process with ``error: <message>`` and, in a multi-process job, tells the others (whose
  ``watch_for_failures`` threads end them too, within a second or so): a process that fails alone
  would otherwise leave the rest waiting in a collective until the coordinator's heartbeat gives up."""
  if jax.process_count() == 1:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
  _ending.set()
  index = jax.process_index()
  text = message if index == 0 else f"process {index}: {message}"
  try:
    _client().key_value_set(FAILURE_KEY, text)
  except Exception:  # noqa: BLE001 - another process reported first
    pass
  _exit_now(text, code)


def _exit_now(text: str, code: int):
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # not sys.exit: its shutdown barrier would wait for the processes stuck in a collective


def watch_for_failures():
  """In a multi-process job, a daemon thread that looks twice a second for another process's ``end_job``
  and then ends this one with that process's message."""
  if jax.process_count() == 1:
    return

  def watch():
    client = _client()
    while not _ending.wait(0.5):
      try:
        text = client.key_value_try_get(FAILURE_KEY)
      except Exception:  # noqa: BLE001 - no failure reported (NOT_FOUND)
        continue
      if not _ending.is_set():
        _exit_now(text, 1)

  watcher = threading.Thread(target=watch, name="jalign-failure-watch", daemon=True)
  watcher.start()

  def stop():  # a job that ends well stops watching before JAX's own shutdown closes the client
    _ending.set()
    watcher.join(timeout=5)

  atexit.register(stop)


def broadcast_object(obj=None):
  """Process 0's ``obj`` (any picklable value; the others pass nothing) on every process of the job.
  Between processes of one job only: the bytes are unpickled as they come."""
  if jax.process_count() == 1:
    return obj
  import pickle

  import numpy as np
  from jax.experimental import multihost_utils

  leader = jax.process_index() == 0
  data = pickle.dumps(obj) if leader else b""
  size = multihost_utils.broadcast_one_to_all(np.asarray([len(data)], np.int64))
  buffer = np.frombuffer(data, np.uint8) if leader else np.zeros(int(size[0]), np.uint8)
  return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


STOP = "__stop__"


class LeaderCalls:
  """A job spread over the job's processes, driven by process 0 alone: each call of one of ``methods``
  is sent to every other process, which makes it too (``follow``, where ``key`` names the job), so that
  all run it as one program (NeMo-Aligner's server signal loop). Other attributes are process 0's own."""

  def __init__(self, job, methods, key: str):
    self._job, self._methods, self._key = job, frozenset(methods), key

  def __getattr__(self, name):
    value = getattr(self._job, name)
    if name not in self._methods or jax.process_count() == 1:
      return value

    def call(*args, **kwargs):
      broadcast_object((self._key, name, args, kwargs))
      return value(*args, **kwargs)
    return call


def stop_followers():
  """Releases the other processes from ``follow``."""
  if jax.process_count() > 1:
    broadcast_object((STOP, None, (), {}))


def follow(jobs: dict):
  """On a process other than 0: make process 0's calls of ``jobs[key]`` (see ``LeaderCalls``) until it
  stops them. A call that fails fails on process 0 too, which answers for it; the loop goes on."""
  while True:
    key, name, args, kwargs = broadcast_object()
    if key == STOP:
      return
    try:
      getattr(jobs[key], name)(*args, **kwargs)
    except Exception:  # noqa: BLE001 - process 0 reports it to the caller
      pass


def launch_rank(process_id: int = -1) -> int:
  """This process's rank before ``initialize`` (``process_id`` when given, else the cluster's), so that
  process 0 can start what must precede JAX's threads (PyTriton's fork)."""
  if process_id >= 0:
    return process_id
  for variable in ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
    if variable in os.environ:
      return int(os.environ[variable])
  return 0
