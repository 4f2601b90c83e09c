"""What a run folder keeps about the runs made in it: the config they ran with.

``config.json`` is the config of the newest run in the folder (what ``run:`` readers rebuild the model
from). It is checked once the run has been validated and its data read, and written once training has
started (after a resume's checkpoint was read), so that a run that fails to start never replaces a
finished run's record. A folder that holds checkpoints is resumed only with the config
they were trained with: a change to what training computes is refused with the differing keys named,
unless ``train.allow_config_change`` is set, and then each config is kept under the step it took over at
(``configs/step_<N>.json``). Changes that leave the training arithmetic alone (the length, intervals,
mesh and processes of the run) are always allowed, and recorded the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from jalign import config as config_lib
from jalign.checkpoints import checkpoint_steps
from jalign.specs.base import ConfigError

# Keys a resume may change freely: they say how long and where a run goes on, where its servers listen
# and how memory is spent, not what a step computes.
FREE_KEYS = ("run_dir", "train.max_steps", "train.val_check_interval", "train.save_interval", "train.keep_last",
             "train.keep_best", "train.max_time_s", "train.log_every", "train.resume", "train.wandb_project",
             "train.allow_config_change", "train.skip_unreadable_checkpoints", "train.micro_batch_size",
             "model.remat", "reference.offload", "critic.server", "critic.serve_address", "critic.max_request_rows",
             "critic.connect_timeout_s", "critic.timeout_s")
FREE_PREFIXES = ("mesh.", "distributed.", "generation.")


def flat(tree: dict, prefix: str = "") -> dict:
  """``{"a": {"b": 1}} -> {"a.b": 1}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_json(c) -> dict:
  return json.loads(c.to_json_best_effort())


def config_changes(saved: dict, current: dict) -> dict:
  """``{key: (saved value, current value)}`` for every dotted key whose value differs."""
  a, b = flat(saved), flat(current)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_free(key: str) -> bool:
  return key in FREE_KEYS or key.startswith(FREE_PREFIXES)


def describe(changes: dict) -> str:
  return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def _changes(c) -> tuple[dict, dict]:
  """``(changes, computing changes)`` of config ``c`` from the config its run folder's checkpoints were
  trained with (none when the folder has no checkpoints)."""
  config_file = Path(c.run_dir) / "config.json"
  if not (checkpoint_steps(Path(c.run_dir) / "checkpoints") and config_file.is_file()):
    return {}, {}
  changes = config_changes(_as_json(config_lib.read_saved(config_file)), _as_json(c))
  return changes, {k: v for k, v in changes.items() if not is_free(k)}


def check_config(c) -> tuple[dict, dict]:
  """Refuses config ``c`` when its run folder holds checkpoints trained with a config that computed
  otherwise (see the module's docstring), naming the differing keys; else ``_changes(c)``."""
  changes, computing = _changes(c)
  if computing and not c.train.allow_config_change:
    latest = checkpoint_steps(Path(c.run_dir) / "checkpoints")[-1]
    raise ConfigError(f"config: {c.run_dir} holds checkpoints (latest step {latest}) trained with a different "
                      f"config: {describe(computing)}; use another run_dir, or set "
                      "train.allow_config_change=True to resume with these changes")
  return changes, computing


def record_config(c, start_step: int = 0, log=print) -> None:
  """Writes config ``c`` as its run folder's ``config.json`` once its run has started training at
  ``start_step`` (restored from that checkpoint, or 0); when it differs from the config that trained
  the checkpoints, each is kept under the step it took over at, and the change is said."""
  changes, computing = check_config(c)
  if not start_step:  # a fresh start in the folder: nothing to keep beside it
    changes = computing = {}
  run_dir = Path(c.run_dir)
  config_file = run_dir / "config.json"
  current = json.dumps(_as_json(c), indent=2)
  if jax.process_index() != 0:  # one writer per job
    return
  if changes:
    history = run_dir / "configs"
    if not history.is_dir():  # the saved config has held since the folder's first step
      history.mkdir()
      (history / "step_0.json").write_text(config_file.read_text())
    (history / f"step_{start_step}.json").write_text(current)
    (log if not computing else _warn)(f"resuming at step {start_step} with a changed config: {describe(changes)} "
                                      f"(each config is kept in {history})")
  _write_atomically(config_file, current)


def _warn(text: str) -> None:
  print(f"warning: {text}", file=sys.stderr, flush=True)


def _write_atomically(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
