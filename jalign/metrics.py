"""What a run writes and shows: ``metrics.jsonl``, TensorBoard and W&B (``MetricsWriter``), and the
progress bar or plain progress lines (``Progress``), on process 0 of a job only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
  """``metrics.jsonl`` and TensorBoard event files in the run folder; W&B when a project is named."""

  def __init__(self, run_dir: Path, wandb_project: str | None = None, config: dict | None = None):
    self.path = run_dir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0  # one writer per job
    self._wandb = None
    if not self.enabled:
      return
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(str(run_dir / "tensorboard"))
    if wandb_project:
      import wandb  # optional: only when the config asks for it
      self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
    self._file.flush()
    for k, v in clean.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    if self._wandb is not None:
      self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

  def close(self):
    if not self.enabled:
      return
    self._file.close()
    self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


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
