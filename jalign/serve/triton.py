"""Starting PyTriton next to JAX.

PyTriton 0.7 pins numpy<2 while this JAX needs numpy>=2. The server itself runs in this process (numpy 2
is fine there); Triton's Python-backend stub, a separate process, needs numpy<2, so it runs from a
Python environment of its own: ``$JALIGN_TRITON_PYTHON_ENV``, or ``.venv-triton`` at the repository
root (``make`` creates it). The stub also links libpython, so this interpreter's library folder goes
first on its ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

STUB_ENV_VARIABLE = "JALIGN_TRITON_PYTHON_ENV"
DEFAULT_STUB_ENV = Path(__file__).resolve().parents[2] / ".venv-triton"


class ServeError(RuntimeError):
  pass


def parse_address(address: str, key: str) -> tuple[str, int]:
  """``"host:port"`` -> ``(host, port)``; ``key`` names the config key in the error."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ServeError(f"config.{key}: {address!r} is not host:port")
  return host, int(port)


def _prepare_environment():
  try:
    import pytriton.server.triton_server as triton_server
  except ImportError as e:
    raise ServeError(f"PyTriton is not installed ({e}); `make serve-deps` installs it") from e
  if int(np.__version__.split(".")[0]) >= 2:
    stub_env = Path(os.environ.get(STUB_ENV_VARIABLE) or DEFAULT_STUB_ENV)
    if not (stub_env / "bin" / "python").exists():
      raise ServeError(f"Triton's Python backend needs numpy<2, and numpy here is {np.__version__}: no Python "
                       f"environment at {stub_env} (${STUB_ENV_VARIABLE}); `make serve-deps` makes one")
    triton_server.get_triton_python_backend_python_env = lambda: stub_env
  libdir = sysconfig.get_config_var("LIBDIR")
  os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def stop_on_sigterm():
  """SIGTERM stops the server again (``jax.distributed.initialize`` installs a handler of its own)."""
  signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def server(host: str, port: int):
  """A started ``pytriton.triton.Triton`` serving HTTP on ``port`` (gRPC on port + 1, metrics on
  port + 2); stopped, with its Triton process, on leaving, on SIGTERM as on Ctrl-C."""
  _prepare_environment()
  from pytriton.triton import Triton, TritonConfig

  config = TritonConfig(http_address=host, http_port=port, grpc_address=host, grpc_port=port + 1,
                        metrics_address=host, metrics_port=port + 2, allow_gpu_metrics=False, exit_on_error=True,
                        # Triton gets SIGTERM when this process dies (PyTriton sets its parent-death signal):
                        # it must not wait long for the answers of a process that is gone.
                        exit_timeout_secs=3)

  previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    with Triton(config=config) as triton:
      yield triton
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


class BadRequest(ValueError):
  """A request a jalign server refuses. PyTriton answers an infer function's error with the error
  formatted by ``traceback.format_exception``; this one has no traceback to format, so the answer is
  its one line (``BadRequest: tokens: id 999999999 ... is outside the vocabulary of 512``)."""

  __traceback__ = property(lambda self: None, lambda self, value: None)


def check_tokens(tokens: np.ndarray, vocab_size: int, *, max_rows: int, name: str = "tokens") -> None:
  """Refuses a ``[B, S]`` token batch of more than ``max_rows`` rows or with an id outside the vocabulary."""
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise BadRequest(f"{name}: expected a [rows, columns] array of token ids, got shape {tokens.shape}")
  if tokens.shape[0] > max_rows:
    raise BadRequest(f"{name}: {tokens.shape[0]} rows, more than the {max_rows} this server takes in one request")
  bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
  if len(bad):
    row, column = bad[0]
    raise BadRequest(f"{name}: id {tokens[row, column]} at row {row}, column {column} is outside the vocabulary "
                     f"of {vocab_size}")


def check_lengths(lengths: np.ndarray, columns: int, name: str = "sequence_lengths") -> None:
  """Refuses lengths outside [1, columns of the request]."""
  bad = np.flatnonzero((lengths < 1) | (lengths > columns))
  if len(bad):
    raise BadRequest(f"{name}: {lengths[bad[0]]} at row {bad[0]} is not a length between 1 and the request's "
                     f"{columns} columns")


def each_request(fn):
  """An infer function of a model without batching: ``fn(**inputs)`` for each request as it came."""
  def infer(requests):
    return [fn(**dict(request.items())) for request in requests]
  return infer


def _reason(error: BaseException) -> str:
  """One line of a failed call's error: the server's own exception where the answer carries its
  traceback, else the error's first line."""
  text = str(error)
  raised = re.findall(r"^\s*((?:\w+\.)*\w*(?:Error|Exception): .+)$", text, re.MULTILINE)
  return raised[-1].strip() if raised else f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0]}"


class ServerGone(ServeError):
  """The server stopped answering while a call waited for it."""


class Client:
  """Calls to the models of a PyTriton server at ``address`` (``host:port`` or a URL).

  A call waits at most ``timeout_s`` for its answer and checks every ``health_every_s`` seconds
  meanwhile that the server is still there (its HTTP liveness endpoint), so that a server that died is
  noticed within seconds rather than at the timeout: ``ServerGone`` names it."""

  def __init__(self, address: str, timeout_s: float, *, health_every_s: float = 2.0):
    self.url = address if "://" in address else f"http://{address}"
    self.timeout_s, self.health_every_s = timeout_s, health_every_s

  def wait_for(self, models, timeout_s: float):
    """Returns once the server serves every one of ``models``; raises the client's error if it does not
    within ``timeout_s``."""
    from pytriton.client import ModelClient
    with warnings.catch_warnings():  # a short timeout is meant here
      warnings.filterwarnings("ignore", message="Client network and/or connection timeout")
      for name in models:
        with ModelClient(self.url, name, init_timeout_s=timeout_s) as client:
          client.wait_for_model(timeout_s)

  def alive(self) -> str | None:
    """None while the server answers its liveness endpoint, else why not."""
    try:
      with urllib.request.urlopen(f"{self.url}/v2/health/live", timeout=max(1.0, self.health_every_s)) as answer:
        return None if answer.status == 200 else f"liveness answered HTTP {answer.status}"
    except urllib.error.HTTPError as e:
      return f"liveness answered HTTP {e.code}"
    except (OSError, urllib.error.URLError) as e:
      return str(getattr(e, "reason", e))

  def _gone_within(self, seconds: float) -> str | None:
    """Why the server is not alive, once its liveness check fails within ``seconds``; else None."""
    deadline = time.monotonic() + seconds
    while (why := self.alive()) is None and time.monotonic() < deadline:
      time.sleep(0.5)
    return why

  def infer(self, name: str, *, batched: bool = False, **inputs) -> dict:
    """One request to model ``name``: a batch of rows (``batched``), or one sample of whole arrays."""
    from pytriton.client import ModelClient

    outcome: dict = {}

    def call():
      try:
        with ModelClient(self.url, name, init_timeout_s=self.timeout_s, inference_timeout_s=self.timeout_s) as client:
          outcome["answer"] = client.infer_batch(**inputs) if batched else client.infer_sample(**inputs)
      except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        outcome["error"] = e

    # A daemon thread: one stuck on a dead server must not hold the process at exit.
    thread = threading.Thread(target=call, name=f"triton:{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + self.timeout_s
    while thread.is_alive():
      thread.join(self.health_every_s)
      if not thread.is_alive():
        break
      why = self.alive()
      if why is not None:
        raise ServerGone(f"stopped answering during {name} ({why})")
      if time.monotonic() > deadline:
        raise ServerGone(f"no answer to {name} within {self.timeout_s:.0f} s")
    if "error" in outcome:
      error = outcome["error"]
      refused = re.search(r"BadRequest: (.*)", str(error))
      if refused:  # the server's one line, without the wrapping Triton adds
        raise ServeError(f"{self.url} refused the request to {name}: {refused.group(1)}") from None
      # A connection closed under the call is most often the server dying: its liveness says so within
      # a few seconds (Triton itself ends a few seconds after the server process).
      why = self._gone_within(3 * self.health_every_s)
      if why is not None:
        raise ServerGone(f"stopped answering during {name} ({why})") from None
      raise ServeError(f"{self.url}: {name} failed: {_reason(error)}") from error
    return outcome["answer"]
