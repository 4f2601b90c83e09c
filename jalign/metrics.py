"""What a run writes and shows: ``metrics.jsonl``, TensorBoard and W&B (``MetricsWriter``), and the
progress bar or plain progress lines (``Progress``), on process 0 of a job only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax


class MetricsWriter:
  """``metrics.jsonl`` and TensorBoard event files in the run folder; W&B when a project is named.

  ``start(resumed_from)`` opens them. A run resumed from the checkpoint of step ``resumed_from`` repeats
  the steps it had logged after that checkpoint: their lines are dropped from ``metrics.jsonl`` (a
  ``resume`` line marks the place) and TensorBoard is told to purge them, so that every step appears once."""

  def __init__(self, run_dir: Path, wandb_project: str | None = None, config: dict | None = None):
    self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0  # one writer per job
    self._wandb_project, self._config = wandb_project, config
    self._file = self._tb = self._wandb = None

  def start(self, resumed_from: int = 0) -> None:
    if not self.enabled or self._file is not None:
      return
    if self.path.is_file():
      _keep_steps_up_to(self.path, resumed_from)
    self._file = open(self.path, "a")
    if resumed_from:
      self._file.write(json.dumps({"step": resumed_from, "split": "resume"}) + "\n")
    self._tb = _summary_writer()(str(self.run_dir / "tensorboard"), purge_step=resumed_from + 1 if resumed_from else None)
    if self._wandb_project:
      import wandb  # optional: only when the config asks for it
      self._wandb = wandb.init(project=self._wandb_project, config=self._config, dir=str(self.run_dir))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    self.start()  # written before the loop started (a rollout made by hand)
    clean = {k: float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
    self._file.flush()
    for k, v in clean.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    if self._wandb is not None:
      self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

  def close(self):
    if self._file is None:
      return
    self._file.close()
    self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
    self._file = self._tb = self._wandb = None


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


def _summary_writer():
  """tensorboardX's SummaryWriter, imported when a run first writes metrics (a command that stops before,
  such as a bad flag, the planner or a server, never waits for it) and without torch: tensorboardX imports
  torch when it is installed (a second or more) only to accept torch tensors, which jalign never writes."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter
