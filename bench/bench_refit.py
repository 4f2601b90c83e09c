"""The local refit of a rollout's generation copy (``jalign.rollout.engine.generation_copy``): the
trained weights, float32 and laid out as training lays them out (fsdp over every device), to the compute
dtype laid out by the generation rules (tensor only; replicated here, with no tensor axis), LoRA
adapters folded in when there are any, in one compiled copy. SmolLM2-135M, timed beside its floor:
reading the trained weights and writing the copy once per device at this machine's memory-copy
bandwidth (numpy, measured in the same run).

  python bench/bench_refit.py [--devices 8] [--dtype bfloat16] [--lora 0] [--rounds 5]

What it does not time: a refit to a served engine in another process (not built yet).
"""

from __future__ import annotations

import argparse
import os
import time


def copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 3) -> float:
  """Bytes moved per second (read plus written) by numpy copying a ``nbytes`` buffer."""
  import numpy as np
  src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * nbytes / best


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--lora", type=int, default=0, help="LoRA rank of adapters to fold in (0: none)")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

  import jax
  from flax import nnx

  from jalign.config import base_config
  from jalign.models import gguf
  from jalign.models.pretrained import smollm2_path
  from jalign.parallel import mesh as pmesh
  from jalign.recipes import build
  from jalign.rollout import engine

  mesh = pmesh.make_mesh({"data": 1, "pipeline": 1, "fsdp": -1, "tensor": 1})
  rules = pmesh.DEFAULT_RULES
  c = base_config()
  c.model.dtype, c.lora.rank = args.dtype, args.lora
  with pmesh.use(mesh, rules):
    model, _ = gguf.load(smollm2_path(), mesh=mesh)
  model = build.algorithm_parts(c, model, mesh, rules)[0]  # with --lora, its adapters placed beside the weights
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  gen_graphdef, refit = engine.generation_copy(c, graphdef, (params, rest), mesh, pmesh.inference_rules(rules))
  copy = jax.block_until_ready(refit((params, rest)))  # compiles
  times = []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    copy = jax.block_until_ready(refit((params, rest)))
    times.append(time.perf_counter() - t0)
  nnx.merge(gen_graphdef, copy)  # the model generation runs

  def shard_bytes(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards)

  read, written = shard_bytes((params, rest)), shard_bytes(copy)
  bandwidth = copy_bandwidth()
  floor = (read + written) / bandwidth
  best = min(times)
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), SmolLM2-135M"
        f"{f' + LoRA rank {args.lora}' if args.lora else ''}: float32 fsdp -> {args.dtype} generation copy")
  print(f"  refit {best * 1000:8.1f} ms (best of {args.rounds}); reads {read / 2**20:.0f} MiB, writes "
        f"{written / 2**20:.0f} MiB over all devices")
  print(f"  floor {floor * 1000:8.1f} ms at {bandwidth / 1e9:.1f} GB/s (numpy copy); refit / floor {best / floor:.1f}x")


if __name__ == "__main__":
  main()
