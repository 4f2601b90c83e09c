"""The ``--config`` flag of the commands that read a config file (``jalign.train``, ``plan``, ``serve``,
``distill``). A flag that does not parse, an override of a key the config does not have, or a config
file that cannot be read ends in one line naming it and exit status 2, never in a traceback."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags


def define(help_text: str = "an ml_collections config file"):
  return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_key(argv, error: Exception) -> str:
  """``--config.a.b: no such key 'b' (did you mean ...)`` from the KeyError ml_collections raises."""
  missing = error.__context__ if isinstance(error.__context__, KeyError) else error
  text = str(missing.args[0]) if missing.args else str(error)
  key, _, hint = text.partition("\n")
  name = key.strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  flag = next((a for a in overrides if name in a[len("--config."):].split(".")), "--config")
  return f"{flag}: no such key {key}" + (f" ({hint.strip()[0].lower()}{hint.strip()[1:]})" if hint.strip() else "")


def _config_path(argv) -> str | None:
  value = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)  # the last wins
  return None if value is None else value.split(":", 1)[0]


def _failed_in(error: BaseException, path: str) -> list:
  """The frames of ``error``'s traceback in the config file at ``path``."""
  return [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]


def parse(argv):
  """absl's flag parsing (``app.run``'s ``flags_parser``), which also loads the config file, with
  one-line errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except Exception as e:  # noqa: BLE001 - the config file's own code failed, or an override names no key
    path = _config_path(argv)
    if isinstance(e, OSError) and path:  # overrides of a config file that could not be opened
      fail(_unreadable(path, e))
    if isinstance(e, SyntaxError):
      fail(f"{e.filename or path}:{e.lineno}: {e.msg}")
    if path and _failed_in(e, path):
      fail(f"{path}:{_failed_in(e, path)[-1].lineno}: {type(e).__name__}: {e}")
    if isinstance(e, (AttributeError, KeyError)):
      fail(_unknown_key(argv, e))
    raise


def read(config_flag, what: str = "configs/<name>.py"):
  """The config ``--config`` names; one line naming the file when it cannot be loaded."""
  c = config_flag.value
  if c is None:
    raise app.UsageError(f"--config={what} is required")
  try:
    c.get("algorithm")  # a config file that could not be opened raises its error on first use
  except OSError as e:
    fail(_unreadable(flags.FLAGS["config"].config_filename, e))
  return c


def _unreadable(path: str, error: OSError) -> str:
  return f"--config={path}: " + ("no such file" if not Path(path).is_file() else str(error).splitlines()[-1].strip())


def run(main):
  """``app.run(main)`` with one-line errors for bad flags and config files."""
  app.run(main, flags_parser=parse)
