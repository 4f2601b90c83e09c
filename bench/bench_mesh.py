"""Tokens/s of an SFT train step on 8 CPU devices for each mesh layout, against one device.

  python bench/bench_mesh.py [--steps 5] [--batch 16] [--seq 128]

On a CPU the fake devices share the same cores, so sharding only adds overhead here: the figures
track that overhead from change to change; they are not a goal.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jalign import trainer  # noqa: E402
from jalign.losses import sft  # noqa: E402
from jalign.models import LlamaConfig, Transformer  # noqa: E402
from jalign.parallel import mesh as pmesh  # noqa: E402

CONFIG = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=8,
                     num_kv_heads=4)
MESHES = [{"data": 8}, {"fsdp": 8}, {"tensor": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
          {"data": 2, "pipeline": 2, "tensor": 2}, {"pipeline": 4, "data": 2}]


def batch(rows, length):
  r = np.random.RandomState(0)
  tokens = r.randint(3, 512, (rows, length)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((rows, length), np.float32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          "segment_ids": np.ones((rows, length), np.int32)}


def time_mesh(sizes, devices, data, steps):
  mesh = pmesh.make_mesh(sizes, devices=devices)
  stages = mesh.shape["pipeline"]
  model = Transformer(CONFIG.replace(pipeline_stages=stages, pipeline_microbatches=stages), rngs=nnx.Rngs(0))
  tx = optax.adamw(1e-4)
  graphdef, state = trainer.init_state(model, tx)
  with pmesh.use(mesh):
    shardings = pmesh.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    batch_sh = pmesh.batch_shardings(data, mesh)
    step = jax.jit(trainer.make_train_step(graphdef, sft.loss, tx), donate_argnums=0,
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None))
    placed = pmesh.put_batch(data, mesh)
    state, m = step(state, placed)
    jax.block_until_ready(m["loss"])
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, placed)
    jax.block_until_ready(m["loss"])
  return (time.perf_counter() - start) / steps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  args = p.parse_args()
  data = batch(args.batch, args.seq)
  tokens = args.batch * args.seq
  base = time_mesh({"data": 1}, jax.devices()[:1], data, args.steps)
  print(f"SFT step, {CONFIG.num_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq}, "
        f"{jax.device_count()} CPU devices on {os.cpu_count()} cores")
  print(f"{'mesh':<28}{'s/step':>10}{'tokens/s':>12}{'vs 1 device':>13}")
  print(f"{'1 device':<28}{base:>10.3f}{tokens / base:>12.0f}{1.0:>12.2f}x")
  for sizes in MESHES:
    t = time_mesh(sizes, None, data, args.steps)
    name = " ".join(f"{k}={v}" for k, v in sizes.items())
    print(f"{name:<28}{t:>10.3f}{tokens / t:>12.0f}{base / t:>12.2f}x")


if __name__ == "__main__":
  main()
