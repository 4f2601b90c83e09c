"""One process of a two-process job driven by process 0 (``python tests/parallel/leader_job.py <id> <port>``):
process 0 makes calls through ``LeaderCalls``; process 1 repeats them in ``follow``. Each call is a
computation over all 8 devices of the job, so it completes only when both processes make it."""

import json
import sys

from jalign.parallel import distributed

process_id, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(f"127.0.0.1:{port}", 2, process_id, local_device_count=4)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jalign.parallel import mesh as pmesh  # noqa: E402


class Job:
  """Sums over a global array spread over both processes' devices; remembers what it was asked."""

  def __init__(self):
    self.mesh = pmesh.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    self.calls = []

  def total(self, values, *, scale=1.0):
    self.calls.append(("total", list(values), scale))
    rows = pmesh.put_global_batch({"x": np.asarray(values, np.float32)}, self.mesh)["x"]
    return float(pmesh.fetch(jax.jit(lambda x: x.sum() * scale)(rows)))

  def fail(self):
    self.calls.append(("fail",))
    raise ValueError("asked to fail")

  def local(self):
    return "process 0 alone"


job = Job()
if process_id == 0:
  leader = distributed.LeaderCalls(job, ("total", "fail"), "job")
  out = {"sums": [leader.total(np.arange(8.0)), leader.total([1.0] * 16, scale=0.5)], "local": leader.local()}
  try:
    leader.fail()
  except ValueError as e:
    out["error"] = str(e)
  out["after_error"] = leader.total(np.ones(8))
  distributed.stop_followers()
else:
  distributed.follow({"job": job})
  out = {}
out["calls"] = job.calls
print(json.dumps(out), flush=True)
