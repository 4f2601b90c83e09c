"""``python -m jalign.distill --config=configs/kd_tiny.py``: the teacher's top-K logits for every token
of a KD config's data (``jalign.recipes.distill``), which ``python -m jalign.train`` then trains on."""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

from jalign.recipes.distill import run
from jalign.specs.base import ConfigError


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError("--config=configs/<name>.py (a kd config) is required")
  try:
    run(config_flag.value)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  config_flag = config_flags.DEFINE_config_file("config", None, "a KD config file", lock_config=True)
  app.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
