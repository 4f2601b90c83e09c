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
import signal
import sysconfig
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
                        metrics_address=host, metrics_port=port + 2, allow_gpu_metrics=False, exit_on_error=True)

  previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    with Triton(config=config) as triton:
      yield triton
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def each_request(fn):
  """An infer function of a model without batching: ``fn(**inputs)`` for each request as it came."""
  def infer(requests):
    return [fn(**dict(request.items())) for request in requests]
  return infer


class Client:
  """Calls to the models of a PyTriton server at ``address`` (``host:port`` or a URL)."""

  def __init__(self, address: str, timeout_s: float):
    self.url = address if "://" in address else f"http://{address}"
    self.timeout_s = timeout_s

  def wait_for(self, models, timeout_s: float):
    """Returns once the server serves every one of ``models``; raises the client's error if it does not
    within ``timeout_s``."""
    from pytriton.client import ModelClient
    with warnings.catch_warnings():  # a short timeout is meant here
      warnings.filterwarnings("ignore", message="Client network and/or connection timeout")
      for name in models:
        with ModelClient(self.url, name, init_timeout_s=timeout_s) as client:
          client.wait_for_model(timeout_s)

  def infer(self, name: str, *, batched: bool = False, **inputs) -> dict:
    """One request to model ``name``: a batch of rows (``batched``), or one sample of whole arrays."""
    from pytriton.client import ModelClient
    with ModelClient(self.url, name, init_timeout_s=self.timeout_s, inference_timeout_s=self.timeout_s) as client:
      return client.infer_batch(**inputs) if batched else client.infer_sample(**inputs)
