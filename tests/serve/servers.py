"""Starting jalign's servers for tests: free ports on loopback, ``python -m jalign.serve`` once it serves."""

import re
import socket
import subprocess
import threading
import time

from tests.conftest import ROOT, launch_job


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


def config_args(values, config: str = "ppo_tiny") -> list[str]:
  """Command-line arguments of a shipped config with the dotted-key ``values``."""
  return [f"--config={ROOT / 'configs' / f'{config}.py'}", *(f"--config.{key}={value}" for key, value in values.items())]


def ppo_args(values) -> list[str]:
  return config_args(values)


def start_server(values, lines=None, config: str = "ppo_tiny"):
  """``python -m jalign.serve`` of a shipped config (8 CPU devices) with ``values``, once it serves:
  ``(process, its output lines)`` (``lines``, when given, gets them)."""
  (process,) = launch_job("jalign.serve", config_args(values, config), 1, 8, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, ready = ([] if lines is None else lines), threading.Event()

  def read():
    for line in process.stdout:
      lines.append(line)
      # The server's line may land inside a line of Triton's log, which shares its output.
      if re.search(r"serving [\w, ]+ at ", line):
        ready.set()
  threading.Thread(target=read, daemon=True).start()
  deadline = time.monotonic() + 180
  while not ready.is_set() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  assert ready.is_set(), "".join(lines[-40:])
  return process, lines


def listening(port) -> bool:
  with socket.socket() as s:
    try:
      s.connect(("127.0.0.1", port))
      return True
    except ConnectionRefusedError:
      return False


def checkpoint_files(folder) -> dict:
  return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_server_while_training(server, actor, checkpoints, port) -> str:
  """kill -9 of ``server`` (serving at ``port``) once the ``actor`` process training through it has
  saved checkpoint 4; checks that the actor then ends within 30 s with exit status 1, that checkpoint 2
  is as it was and that nothing of the server is left listening. The actor's stderr."""
  try:
    deadline = time.monotonic() + 180
    while not (checkpoints / "4").is_dir() and actor.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert (checkpoints / "4").is_dir(), actor.communicate(timeout=60)[1][-3000:]
    saved = checkpoint_files(checkpoints / "2")
    server.kill()
    killed = time.monotonic()
    _, err = actor.communicate(timeout=60)
    assert time.monotonic() - killed < 30
  finally:
    for p in (actor, server):
      if p.poll() is None:
        p.kill()
  assert actor.returncode == 1, err[-3000:]
  assert checkpoint_files(checkpoints / "2") == saved
  deadline = time.monotonic() + 15  # Triton, the server's child, goes with it
  while any(listening(port + i) for i in range(3)) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not any(listening(port + i) for i in range(3))
  return err
