"""The local refit of a rollout's generation copy (``jalign.rollout.engine.generation_copy``): the
trained weights, float32 and laid out as training lays them out (fsdp over every device), to the compute
dtype laid out by the generation rules (tensor only; replicated here, with no tensor axis), LoRA
adapters folded in when there are any, in one compiled copy. SmolLM2-135M, timed beside its floor:
reading the trained weights and writing the copy once per device at this machine's memory-copy
bandwidth (numpy, measured in the same run).

  python bench/bench_refit.py [--devices 8] [--dtype bfloat16] [--lora 0] [--rounds 5]
  python bench/bench_refit.py --served [--devices 1] [--dtype bfloat16] [--bucket-mb 512] [--rounds 5]

``--served`` times the served engine's refit instead (``jalign.serve.engine.ServedEngine``): a
generation server of SmolLM2-135M started here (``python -m jalign.serve``, the same devices, its own
process on loopback) pulls the copy from this process's transfer server bucket by bucket. Printed: the
whole refit (local copy, offer, the server's pulls and swap), the server's pulls alone, and the floor of
moving the copy's bytes once at the memory-copy bandwidth.
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
  p.add_argument("--served", action="store_true", help="time a refit of a generation server in another process")
  p.add_argument("--bucket-mb", type=float, default=512.0)
  p.add_argument("--devices", type=int, default=0, help="default: 8, or 1 with --served")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--lora", type=int, default=0, help="LoRA rank of adapters to fold in (0: none)")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  args.devices = args.devices or (1 if args.served else 8)
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  if args.served:
    return served(args)

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


def served(args):
  """The served engine's refit of SmolLM2-135M: ``args.rounds`` refits to new versions, timed."""
  import socket
  import subprocess
  import sys
  from pathlib import Path

  import jax
  from flax import nnx

  from jalign.config import base_config
  from jalign.models import gguf
  from jalign.models.pretrained import smollm2_path
  from jalign.parallel import mesh as pmesh
  from jalign.serve.engine import ServedEngine

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  address = f"127.0.0.1:{port}"
  root = Path(__file__).resolve().parents[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "jalign.serve", f"--config={root / 'configs' / 'sft_smollm2.py'}",
       "--config.generation.serve=True", f"--config.generation.serve_address={address}",
       f"--config.model.dtype={args.dtype}", "--config.mesh.fsdp=1", "--config.mesh.data=-1",
       f"--config.distributed.local_device_count={args.devices}", "--config.run_dir=/tmp/bench_refit_server"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    mesh = pmesh.make_mesh({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
    rules = pmesh.DEFAULT_RULES
    c = base_config()
    c.model.dtype = args.dtype
    c.rollout.update({"engine": "served", "engine_server": address, "refit_bucket_mb": args.bucket_mb})
    with pmesh.use(mesh, rules):
      model, _ = gguf.load(smollm2_path(), mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    served_engine = ServedEngine(c, graphdef, mesh, rules, pmesh.inference_rules(rules), log=lambda *_: None)
    totals, pulls = [], []
    for version in range(args.rounds + 1):  # the first compiles the copy
      served_engine.update_weights(version, (params, rest))
      if version:
        totals.append(served_engine.refit_seconds)
        pulls.append(served_engine.pulled["seconds"])
    copied = served_engine.pulled["bytes"]
  finally:
    server.terminate()
    server.wait(60)
  bandwidth = copy_bandwidth()
  floor = copied / bandwidth
  print(f"{jax.device_count()} device(s) ({jax.devices()[0].platform}) each side, SmolLM2-135M {args.dtype}: refit "
        f"of a generation server on loopback, {served_engine.pulled['buckets']} buckets of <= {args.bucket_mb:.0f} MiB")
  print(f"  refit {min(totals) * 1000:8.1f} ms (best of {args.rounds}; local copy, offer, pulls and swap)")
  print(f"  pulls {min(pulls) * 1000:8.1f} ms of it, {copied / 2**20:.0f} MiB")
  print(f"  floor {floor * 1000:8.1f} ms: the bytes moved once at {bandwidth / 1e9:.1f} GB/s (numpy copy); "
        f"refit / floor {min(totals) / floor:.1f}x")


if __name__ == "__main__":
  main()
