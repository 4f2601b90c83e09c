"""``python -m jalign.distill --config=configs/kd_tiny.py``: the teacher's top-K logits for every token
of a KD config's data (``jalign.recipes.distill``), which ``python -m jalign.train`` then trains on.
Like ``jalign.train`` it runs as one job over several processes (``config.distributed``)."""

from __future__ import annotations

import sys

import jax
from absl import app, logging

from jalign import config_flag as config_flag_lib
from jalign.parallel import distributed
from jalign.recipes.distill import run
from jalign.specs.base import ConfigError


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = config_flag_lib.read(config_flag, "configs/<name>.py (a kd config)")
  dist = c.distributed
  distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id, dist.local_device_count)
  try:
    run(c, log=print if jax.process_index() == 0 else (lambda *_: None))
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  config_flag = config_flag_lib.define("a KD config file")
  config_flag_lib.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
