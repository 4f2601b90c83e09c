"""``python -m jalign.distill --config=configs/kd_tiny.py``: the teacher's top-K logits for every token
of a KD config's data (``jalign.recipes.distill``), which ``python -m jalign.train`` then trains on.
Like ``jalign.train`` it runs as one job over several processes (``config.distributed``)."""

from __future__ import annotations

import sys

import jax
from absl import app, logging
from ml_collections import config_flags

from jalign.parallel import distributed
from jalign.recipes.distill import run
from jalign.specs.base import ConfigError


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError("--config=configs/<name>.py (a kd config) is required")
  dist = config_flag.value.distributed
  distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id, dist.local_device_count)
  try:
    run(config_flag.value, log=print if jax.process_index() == 0 else (lambda *_: None))
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  config_flag = config_flags.DEFINE_config_file("config", None, "a KD config file", lock_config=True)
  app.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
