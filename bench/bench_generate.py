"""Rollout generation with its rows split over the data-parallel devices against every device decoding
the whole batch (what replicated prompts make XLA do), side by side in one run.

  python bench/bench_generate.py [--devices 8] [--batch 64] [--new 24] [--preset tiny] [--rounds 3]

The model's parameters are placed as a training run places them (the default rules, ``data`` over every
device); the prompts are the bundled chat prompts' lengths. Times are the fastest of ``--rounds`` runs
after a compiling one; the outputs of the two are checked to be equal.
"""

from __future__ import annotations

import argparse
import os
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--new", type=int, default=24)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

  import jax
  import numpy as np
  from flax import nnx

  from jalign.models import LlamaConfig, Transformer
  from jalign.parallel import mesh as pmesh
  from jalign.rollout import generate

  mesh = pmesh.make_mesh({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
  model = Transformer(LlamaConfig.preset(args.preset), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, pmesh.place(state, pmesh.tree_shardings(state, mesh)))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, rng.integers(8, 40)).tolist() for _ in range(args.batch)]
  rows = pmesh.batch_sharding(mesh)
  cases = {"every device decodes all rows": None, "rows split over devices": rows}
  best, outputs = {}, {}
  for name, sharding in cases.items():
    out = generate(model, prompts, max_new_tokens=args.new, seed=1, batch_sharding=sharding)  # compiles
    jax.block_until_ready(out.tokens)
    times = []
    for _ in range(args.rounds):
      t0 = time.perf_counter()
      out = generate(model, prompts, max_new_tokens=args.new, seed=1, batch_sharding=sharding)
      jax.block_until_ready(out.tokens)
      times.append(time.perf_counter() - t0)
    best[name], outputs[name] = min(times), np.asarray(out.tokens)
  same = all(np.array_equal(o, outputs["every device decodes all rows"]) for o in outputs.values())
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), {args.preset}, {args.batch} prompts, "
        f"{args.new} new tokens; outputs equal: {same}")
  base = best["every device decodes all rows"]
  for name, t in best.items():
    print(f"  {name:32s} {t * 1000:8.1f} ms   {base / t:5.2f}x")


if __name__ == "__main__":
  main()
