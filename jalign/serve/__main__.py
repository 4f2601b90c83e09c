"""python -m jalign.serve --config=configs/<name>.py [--config.<key>=<value> ...]

Starts the PyTriton server the config names and serves until stopped (Ctrl-C or SIGTERM). For a ``ppo``
config: the critic and reward model at ``config.critic.serve_address``; run the actor with
``--config.critic.server=<that address>``. With ``config.generation.serve``: the config's policy for
generation (``jalign.serve.generation``), on the same server for a ``ppo`` config, else at
``config.generation.serve_address``.
"""

from __future__ import annotations

import sys
import threading

from absl import app, logging
from ml_collections import config_flags

from jalign import config as config_lib
from jalign import critic as critic_lib
from jalign import reinforce
from jalign.serve import critic as critic_server
from jalign.serve import generation as generation_server
from jalign.serve import triton


def serve(c, log=print):
  critic = c.algorithm == "ppo"
  if not critic and not c.generation.serve:
    raise config_lib.ConfigError(f"config.algorithm: a {c.algorithm} config names no server (ppo's critic "
                                 "and reward model do; config.generation.serve=True serves the policy)")
  config_lib.validate(c)
  key = "critic.serve_address" if critic else "generation.serve_address"
  host, port = triton.parse_address(c.critic.serve_address if critic else c.generation.serve_address, key)
  with triton.server(host, port) as server:
    # Triton's process starts (a fork) before JAX starts its threads: forking a multithreaded JAX
    # process can deadlock. The models are bound to the running server afterwards.
    server.run()
    lock = threading.Lock()  # one call at a time over all the models, as NeMo's servers serialise them
    models, notes = [], []
    if critic:
      # The critic's checkpoints are kept as the actor's are: validation reward, keep_last, keep_best.
      job = critic_lib.build(c, reinforce.trainer_options(c, bool(c.data.validation)))
      critic_server.bind(server, job, c, lock)
      models += critic_server.MODELS
      notes.append(f"critic checkpoints: {job.directory}")
    if c.generation.serve:
      generation_server.bind(server, generation_server.GenerationJob(c), lock)
      models += generation_server.MODELS
      notes.append(f"policy: {c.model.init}")
    log(f"serving {', '.join(models)} at http://{host}:{port} ({'; '.join(notes)})", flush=True)
    server.serve()


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  try:
    serve(config_flag.value)
  except (config_lib.ConfigError, triton.ServeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("stopped", flush=True)


def entry():
  config_flag = config_flags.DEFINE_config_file("config", None, "an ml_collections config file", lock_config=True)
  app.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
