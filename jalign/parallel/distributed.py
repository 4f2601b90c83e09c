"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

Call ``initialize`` before anything touches a JAX device. An explicit coordinator address (with
the number of processes and this process's id) wins; otherwise a Slurm or Open MPI job with more
than one task, or ``JAX_COORDINATOR_ADDRESS`` in the environment, lets JAX find its peers itself.
A single process needs nothing.
"""

from __future__ import annotations

import os

import jax


def _launched_by_a_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "JAX_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               local_device_count: int = 0, timeout_s: int = 300) -> bool:
  """Join the job's processes; returns True when this is a multi-process run."""
  if local_device_count:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"with coordinator_address {coordinator_address!r}, num_processes ({num_processes}) and "
                       f"process_id ({process_id}) must describe this process")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True
  if _launched_by_a_cluster():
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False
