"""Orbax checkpoints of a run: the manager every trained model saves with, the steps complete on disk,
and what a failed write says."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path

import orbax.checkpoint as ocp


def checkpoint_manager(directory, o, *, name: str | None = None) -> ocp.CheckpointManager:
  """Async, atomic checkpoints in ``directory`` keeping the last ``o.keep_last`` and the best
  ``o.keep_best`` by ``o.monitor`` (``o``: the run's ``trainer.TrainerOptions``). ``name`` sets apart the
  cross-process barriers of a second model saved at the same steps (PPO's critic beside the actor): orbax names a save's barriers by its step
  alone, and two saves of one step in flight at once would share them."""
  policies = [ocp.checkpoint_managers.LatestN(n=max(1, o.keep_last))]
  if o.keep_best:
    policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[o.monitor],
                                                   reverse=not o.monitor_higher_is_better,
                                                   n=o.keep_best, keep_checkpoints_without_metrics=False))
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
          enable_async_checkpointing=True, cleanup_tmp_directories=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)))


def checkpoint_steps(folder: Path) -> list[int]:
  """The steps of the complete checkpoints in ``folder`` (orbax renames a step's folder to the bare step
  number once all of it is written)."""
  folder = Path(folder)
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def restore_newest_readable(manager: ocp.CheckpointManager, args) -> tuple[int | None, object, list]:
  """``(step, restored, unreadable)``: the newest checkpoint of ``manager`` that reads with ``args``
  (None when none does) and ``[(step, reason)]`` of the newer ones that do not."""
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, manager.restore(step, args=args), unreadable
    except Exception as e:  # noqa: BLE001 - a torn or corrupted file: whatever the reader raised
      unreadable.append((step, failure_reason(e)))
  return None, None, unreadable


def failure_reason(error: BaseException) -> str:
  """What the operating system said about a failed write in ``error``'s chain (``No space left on
  device``; TensorStore reports it as ``os_error_code='28'``), else the first line of the chain's root
  cause (TensorStore's ``OUT_OF_RANGE: Error reading ...`` under orbax's generic exception)."""
  seen, root = error, error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    code = re.search(r"os_error_code='(\d+)'", str(seen))
    if code:
      return os.strerror(int(code.group(1)))
    root, seen = seen, seen.__cause__ or seen.__context__
  text = str(root).strip().splitlines()
  return text[0][:300] if text else type(root).__name__


def leave_failed_writes_to_the_trainer() -> None:
  """For a command line that reports a failed checkpoint write in one line (the ``Trainer`` raises a
  ``TrainingError`` naming it): orbax's own error logs of the write, asyncio's of its orphaned futures
  (TensorStore's, which carry no frame of orbax) and
  the callbacks TensorStore leaves behind on its closed event loops ("Event loop is closed", as
  unraisable exceptions) are not printed; nor are orbax's unfinished reads of a damaged checkpoint."""
  orbax = f"{os.sep}orbax{os.sep}"

  class NotOrbaxErrors(logging.Filter):
    def filter(self, record):
      if record.levelno < logging.ERROR:
        return True
      raised_in = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
      return not (orbax in record.pathname or any(orbax in frame.filename for frame in raised_in))

  class NotOrphanedFutures(logging.Filter):  # the other reads or writes of a checkpoint when one failed
    def filter(self, record):
      return "exception was never retrieved" not in record.getMessage()

  logging.getLogger("absl").addFilter(NotOrbaxErrors())
  logging.getLogger("asyncio").addFilter(NotOrphanedFutures())
  default = sys.unraisablehook

  def hook(unraisable):  # and the reads of a damaged checkpoint left unfinished when the first one failed
    raised_in = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    if not (closed_loop or any(orbax in frame.filename for frame in raised_in)):
      default(unraisable)

  sys.unraisablehook = hook
