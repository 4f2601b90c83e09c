"""``python -m jalign.train --config=configs/<name>.py [--config.<key>=<value> ...]``.

Reads the config, looks up its algorithm's spec and runs the recipe the spec names: training on a data
file (``jalign.recipes.supervised``), SPIN's iterations, or the rollout algorithms (REINFORCE, rejection
sampling, PPO). The resolved config is saved as ``config.json`` in the run folder.
"""

from __future__ import annotations

import sys
import traceback

import jax
from absl import app, logging

from jalign import checkpoints
from jalign import config_flag as config_flag_lib
from jalign import specs
from jalign.data import formats
from jalign.metrics import MetricsError
from jalign.models.safetensors_io import CheckpointError
from jalign.parallel import distributed
from jalign.recipes import grpo, ppo, reinforce, spin, supervised
from jalign.specs.base import ConfigError
from jalign.trainer import TrainingError

# The recipe a spec names (``AlgorithmSpec.recipe``) -> what runs it.
RECIPES = {"train": supervised.run, "spin": spin.run, "reinforce": reinforce.run, "rs": reinforce.run,
           "ppo": ppo.run, "grpo": grpo.run}


def run(c, log=print) -> dict:
  """Runs config ``c``; returns the recipe's summary (steps, stop reason, the loss of every step run)."""
  return RECIPES[specs.get(c.algorithm).recipe](c, log)


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_flag_lib.read(config_flag)
  checkpoints.leave_failed_writes_to_the_trainer()
  dist = config.distributed
  distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id, dist.local_device_count)
  distributed.watch_for_failures()
  try:
    run(config, log=print if jax.process_index() == 0 else (lambda *_: None))
  except (ConfigError, formats.DataError, CheckpointError) as e:  # bad input: a config, data or model file
    distributed.end_job(str(e), 2)
  except (TrainingError, MetricsError) as e:  # a run that went wrong (a NaN loss, a failed save or write)
    distributed.end_job(str(e), 1)
  except Exception as e:  # a bug: its traceback, then the job ends as for any failure of one of its processes
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    distributed.end_job(f"{type(e).__name__}: {e}", 1)


def entry():
  # Flags are defined here, not at import, so that other entry points can import this module.
  config_flag = config_flag_lib.define()
  config_flag_lib.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
