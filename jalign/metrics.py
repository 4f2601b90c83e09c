"""What a run writes and shows: ``metrics.jsonl``, TensorBoard and W&B (``MetricsWriter``), and the
progress bar or plain progress lines (``Progress``), on process 0 of a job only."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import time
import types
from pathlib import Path

import jax


class MetricsError(RuntimeError):
  """A metrics file that could not be written (a full disk): one line naming it."""


class MetricsWriter:
  """``metrics.jsonl`` and TensorBoard event files in the run folder; W&B when a project is named.

  ``start(resumed_from)`` opens them. A run resumed from the checkpoint of step ``resumed_from`` repeats
  the steps it had logged after that checkpoint: their lines are dropped from ``metrics.jsonl`` (a
  ``resume`` line marks the place) and TensorBoard is told to purge them, so that every step appears once.
  Both files are written in the calling thread: a write that fails raises ``MetricsError``."""

  def __init__(self, run_dir: Path, wandb_project: str | None = None, config: dict | None = None):
    self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0  # one writer per job
    self._wandb_project, self._config = wandb_project, config
    self._file = self._tb = self._wandb = None

  def start(self, resumed_from: int = 0) -> None:
    if not self.enabled or self._file is not None:
      return
    with _named_on_failure(self.run_dir):
      if self.path.is_file():
        _keep_steps_up_to(self.path, resumed_from)
      self._file = open(self.path, "a")
      if resumed_from:
        self._file.write(json.dumps({"step": resumed_from, "split": "resume"}) + "\n")
      self._tb = EventFile(self.run_dir / "tensorboard", purge_step=resumed_from + 1 if resumed_from else None)
    if self._wandb_project:
      import wandb  # optional: only when the config asks for it
      self._wandb = wandb.init(project=self._wandb_project, config=self._config, dir=str(self.run_dir))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    self.start()  # written before the loop started (a rollout made by hand)
    clean = {k: float(v) for k, v in metrics.items()}
    with _named_on_failure(self.path):
      self._file.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
      self._file.flush()
    with _named_on_failure(self._tb.name):
      self._tb.scalars(step, {f"{prefix}/{k}": v for k, v in clean.items()})
    if self._wandb is not None:
      self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

  def close(self) -> None:
    """Closes every file, then raises ``MetricsError`` if one could not be written."""
    if self._file is None:
      return
    files, self._file, self._tb = (self._file, self._tb), None, None
    failed = None
    for f in files:
      try:
        with _named_on_failure(f.name):
          f.close()
      except MetricsError as e:
        failed = failed or e
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
    if failed is not None:
      raise failed


class EventFile:
  """A TensorBoard event file (TFRecord-framed ``Event`` protos), written in the calling thread:
  tensorboardX's SummaryWriter writes from a thread of its own and again at exit, where a failure (a
  full disk) can only print tracebacks."""

  def __init__(self, folder: Path, purge_step: int | None = None):
    self._pb, self._crc = _tensorboard_protos()
    folder.mkdir(parents=True, exist_ok=True)
    self.name = str(folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self._file = open(self.name, "ab")
    self._write(self._pb.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if purge_step:  # TensorBoard drops this run's earlier events from this step on
      self._write(self._pb.Event(wall_time=time.time(), step=purge_step,
                                 session_log=self._pb.SessionLog(status=self._pb.SessionLog.START)))
    self._file.flush()

  def scalars(self, step: int, values: dict) -> None:
    summary = self._pb.Summary(value=[self._pb.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._write(self._pb.Event(wall_time=time.time(), step=step, summary=summary))
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))


@contextlib.contextmanager
def _named_on_failure(path):
  try:
    yield
  except OSError as e:
    raise MetricsError(f"{e.filename or path} could not be written: {e.strerror or e}") from None


def _keep_steps_up_to(path: Path, step: int) -> None:
  """Drops the lines of ``metrics.jsonl`` logged after ``step`` (and any line cut short by a kill)."""
  kept = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(k + "\n" for k in kept))
  tmp.replace(path)


class Progress:
  """A rich progress bar with ETA on a terminal; plain lines every ``every`` steps otherwise."""

  def __init__(self, total: int, start: int, every: int = 10):
    self.total, self.every = total, every
    self._bar = None
    self.quiet = jax.process_index() != 0  # one voice per job
    if sys.stdout.isatty() and not self.quiet:
      from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
      self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
      self._bar.start()
      self._task = self._bar.add_task("train", total=total, completed=start, info="")

  def update(self, step: int, metrics: dict):
    info = " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "grad_norm", "lr", "tokens_per_s") if k in metrics)
    if self._bar is not None:
      self._bar.update(self._task, completed=step, info=info)
    elif not self.quiet and (step % self.every == 0 or step == self.total):
      print(f"step {step}/{self.total} {info}", flush=True)

  def log(self, text: str):
    if not self.quiet:
      (self._bar.console.print if self._bar is not None else print)(text)

  def close(self):
    if self._bar is not None:
      self._bar.stop()


# Dense bfloat16 FLOP/s of one device, by device kind: the denominator of MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def train_flops_per_token(config, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 per parameter, plus attention scores and values."""
  return 6.0 * config.num_params + 12.0 * config.num_layers * config.num_heads * config.head_dim * seq_len


def _tensorboard_protos():
  """TensorBoard's ``Event``, ``Summary`` and ``SessionLog`` protos (from tensorboardX, imported when a run
  first writes metrics, never by a command that stops before) and the TFRecord checksum. Imported without
  torch: tensorboardX imports torch when it is installed (a second or more) only to accept torch tensors,
  which jalign never writes."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
  try:
    from tensorboardX.proto import event_pb2, summary_pb2
    from tensorboardX.record_writer import masked_crc32c
  finally:
    if blocked:
      del sys.modules["torch"]
  protos = types.SimpleNamespace(Event=event_pb2.Event, SessionLog=event_pb2.SessionLog, Summary=summary_pb2.Summary)
  return protos, masked_crc32c
