"""python -m jalign.serve --config=configs/<name>.py [--config.<key>=<value> ...]

Starts the PyTriton server the config names and serves until stopped (Ctrl-C or SIGTERM). For a ``ppo``
config: the critic and reward model at ``config.critic.serve_address``; run the actor with
``--config.critic.server=<that address>``. With ``config.generation.serve``: the config's policy for
generation (``jalign.serve.generation``), on the same server for a ``ppo`` config, else at
``config.generation.serve_address``. Run as a job of several processes (``config.distributed.*`` or the
cluster's environment, as for training), process 0 serves and every process computes each call.
"""

from __future__ import annotations

import sys
import threading

import jax

from absl import app, logging

from jalign import config as config_lib
from jalign import config_flag as config_flag_lib
from jalign import specs
from jalign.parallel import distributed
from jalign.recipes import critic as critic_lib
from jalign.recipes import rollouts
from jalign.recipes.generation import GenerationJob
from jalign.serve import critic as critic_server
from jalign.serve import generation as generation_server
from jalign.serve import triton


# What a server's calls make each job do, which every process of a server job repeats.
CRITIC_CALLS = ("values", "rewards", "train", "save", "wait", "restore")
GENERATION_CALLS = ("generate", "rollout")


def _serves_critic(c) -> bool:
  rollout = specs.get(c.algorithm).rollout
  return rollout is not None and rollout.critic


def _jobs(c) -> dict:
  """The jobs a config serves, built alike on every process of the server job."""
  jobs = {}
  # Each served model runs on this job's own devices, whatever the actor's job has.
  config_lib.require_mesh_fits(c, "critic.mesh" if _serves_critic(c) else "mesh", jax.device_count())
  if c.generation.serve and _serves_critic(c):
    config_lib.require_mesh_fits(c, "mesh", jax.device_count())
  if _serves_critic(c):
    # The critic's checkpoints are kept as the actor's are: validation reward, keep_last, keep_best.
    jobs["critic"] = critic_lib.build(c, rollouts.trainer_options(c, bool(c.data.validation)))
  if c.generation.serve:
    jobs["generation"] = GenerationJob(c)
  return jobs


def serve(c, log=print):
  """Serves what ``c`` names. A server job of several processes (``config.distributed``) spreads its
  models over all their devices: process 0 runs Triton and sends each call to the others, which make
  it too."""
  critic = _serves_critic(c)
  if not critic and not c.generation.serve:
    raise config_lib.ConfigError(f"config.algorithm: a {c.algorithm} config names no server (ppo's critic "
                                 "and reward model do; config.generation.serve=True serves the policy)")
  # The config as its actor's job sees it; the served meshes are checked on this job's devices when
  # they start (``_jobs``).
  config_lib.validate(c, device_count=config_lib.nominal_device_count(c.mesh))
  key = "critic.serve_address" if critic else "generation.serve_address"
  host, port = triton.parse_address(c.critic.serve_address if critic else c.generation.serve_address, key)
  dist = c.distributed
  start_jax = lambda: distributed.initialize(dist.coordinator_address, dist.num_processes,  # noqa: E731
                                             dist.process_id, dist.local_device_count)
  if distributed.launch_rank(dist.process_id if dist.coordinator_address else -1) != 0:
    start_jax()
    distributed.follow(_jobs(c))
    return
  with triton.server(host, port) as server:
    # Triton's process starts (a fork) before JAX starts its threads: forking a multithreaded JAX
    # process can deadlock. The models are bound to the running server afterwards.
    server.run()
    start_jax()
    triton.stop_on_sigterm()
    jobs = _jobs(c)
    lock = threading.Lock()  # one call at a time over all the models, as NeMo's servers serialise them
    models, notes = [], []
    try:
      if "critic" in jobs:
        critic_server.bind(server, distributed.LeaderCalls(jobs["critic"], CRITIC_CALLS, "critic"), c, lock)
        models += critic_server.MODELS
        notes.append(f"critic checkpoints: {jobs['critic'].directory}")
      if "generation" in jobs:
        job = distributed.LeaderCalls(jobs["generation"], GENERATION_CALLS, "generation")
        generation_server.bind(server, job, lock, max_request_rows=c.generation.max_request_rows)
        models += generation_server.MODELS
        notes.append(f"policy: {c.model.init}")
      processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
      log(f"serving {', '.join(models)} at http://{host}:{port} ({'; '.join(notes)}{processes})", flush=True)
      server.serve()
    finally:
      with lock:
        distributed.stop_followers()


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = config_flag_lib.read(config_flag)
  try:
    serve(c)
  except (config_lib.ConfigError, triton.ServeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("stopped", flush=True)


def entry():
  config_flag = config_flag_lib.define()
  config_flag_lib.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
