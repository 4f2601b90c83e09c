"""Rollout generation, side by side in one run; each part prints its ratios.

  python bench/bench_generate.py split [--devices 8] [--batch 64] [--new 24] [--preset tiny] [--rounds 3]
  python bench/bench_generate.py continuous [--prompts 48] [--slots 8] [--rounds 1]
  python bench/bench_generate.py decode [--new 64] [--rounds 2]

``split``: the rows of a batch split over the data-parallel devices against every device decoding the
whole batch (what replicated prompts make XLA do), on fake CPU devices with the tiny preset.

``continuous``: SmolLM2-135M-Instruct (float32) on prompts of 37-176 tokens whose replies end at mixed
lengths, 8 to 256 new tokens (each prompt's own limit, drawn uniformly; no stop token, so every reply
runs to its limit): the static batch (``--slots`` prompts at a time, each batch decoding until its
longest reply ends) against continuous batching with ``--slots`` rows (a row that stops takes the next
prompt). Both must give every prompt the same tokens; tokens/s counts the replies' tokens.

``decode``: SmolLM2-135M-Instruct float32, batch 1 and 8, prompts of 37-176 tokens, ``--new`` new tokens
(greedy, no stop): the whole call and its decode step (the call with ``--new`` tokens less the call with
one, over ``--new - 1`` steps) against transformers' ``generate`` on the same weights, each beside its
floor on this machine: a decode step reads every weight once (bytes over the measured memory bandwidth)
and does 2 FLOPs per weight per row (over the measured float32 matmul rate); the floor is the larger.
Beside it, what XLA's matmuls alone take to multiply the batch's rows by every weight once: the part of
the gap to the floor that the decode loop cannot close by itself on this backend.

Times are the fastest of ``--rounds`` runs after a compiling one (``continuous``: of the programs compiled
ahead, without a run).
"""

from __future__ import annotations

import argparse
import os
import time


def fastest(run, rounds: int, warm: bool = True) -> tuple[float, object]:
  """The fastest of ``rounds`` timed calls of ``run`` (after an untimed one, when ``warm``) and the
  last result."""
  import jax
  out = jax.block_until_ready(run()) if warm else None
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    best = min(best, time.perf_counter() - t0)
  return best, out


def split(args):
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
  cases = {"every device decodes all rows": None, "rows split over devices": pmesh.batch_sharding(mesh)}
  best, outputs = {}, {}
  for name, sharding in cases.items():
    best[name], out = fastest(lambda: generate(model, prompts, max_new_tokens=args.new, seed=1,  # noqa: B023
                                               batch_sharding=sharding).tokens, args.rounds)
    outputs[name] = np.asarray(out)
  same = all(np.array_equal(o, outputs["every device decodes all rows"]) for o in outputs.values())
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), {args.preset}, {args.batch} prompts, "
        f"{args.new} new tokens; outputs equal: {same}")
  base = best["every device decodes all rows"]
  for name, t in best.items():
    print(f"  {name:32s} {t * 1000:8.1f} ms   {base / t:5.2f}x")


def smollm2_prompts(count: int, seed: int = 0):
  """SmolLM2-135M-Instruct (float32), and ``count`` prompts of 37-176 tokens of its vocabulary."""
  import numpy as np

  from jalign.models import gguf
  from jalign.models.pretrained import smollm2_path

  model, tok = gguf.load(smollm2_path())
  rng = np.random.default_rng(seed)
  lengths = [37, 176] + rng.integers(37, 177, max(count - 2, 0)).tolist()
  return model, tok, [rng.integers(100, 20000, n).tolist() for n in lengths[:count]]


def compiled(model, prompts, **options):
  """``generate``'s loop for these prompts, compiled ahead (not run), and a call of it on them."""
  from jalign.rollout.generate import generation_call
  loop, arguments, settings = generation_call(model, prompts, **options)
  program = loop.lower(*arguments, **settings).compile()
  return lambda: program(*arguments)


def continuous(args):
  import jax
  import numpy as np

  model, _, prompts = smollm2_prompts(args.prompts)
  limits = np.random.default_rng(1).integers(8, 257, len(prompts)).tolist()
  limits[:2] = [8, 256]
  width = max(len(p) for p in prompts)
  common = dict(greedy=True, prompt_width=width)
  batches = []
  for start in range(0, len(prompts), args.slots):  # each batch compiled for its longest limit
    batch, cap = prompts[start:start + args.slots], limits[start:start + args.slots]
    batches.append(compiled(model, batch + [batch[0]] * (args.slots - len(batch)),
                            max_new_tokens=cap + [1] * (args.slots - len(batch)), **common))
  flowing = compiled(model, prompts, max_new_tokens=limits, slots=args.slots, **common)
  t_static, parts = fastest(lambda: [run()[0] for run in batches], args.rounds, warm=False)
  t_flowing, out = fastest(lambda: flowing()[0], args.rounds, warm=False)
  tokens = sum(limits)
  out = np.asarray(out)
  # Each static batch is as wide as its own longest reply: compare each prompt's row up to its end.
  ends = [len(p) + limit for p, limit in zip(prompts, limits)]
  same = all(np.array_equal(np.asarray(parts[n // args.slots])[n % args.slots, :end], out[n, :end])
             for n, end in enumerate(ends))
  print(f"SmolLM2-135M float32 on {jax.devices()[0].platform}, {len(prompts)} prompts of 37-176 tokens, replies of "
        f"8-256 tokens ({tokens} in all, mean {tokens / len(prompts):.0f}), {args.slots} rows at a time; "
        f"every prompt's tokens equal: {same}")
  steps_static = sum(max(limits[s:s + args.slots]) for s in range(0, len(prompts), args.slots))
  print(f"  {'static batches':24s} {t_static:7.1f} s  {tokens / t_static:7.1f} tokens/s   1.00x   "
        f"({steps_static} decode steps)")
  print(f"  {'continuous batching':24s} {t_flowing:7.1f} s  {tokens / t_flowing:7.1f} tokens/s  "
        f"{t_static / t_flowing:5.2f}x   (at least {-(-tokens // args.slots)} decode steps)")


def machine_rates() -> tuple[float, float]:
  """(bytes/s read, float32 FLOP/s) this machine reaches with every core: a sum over 1 GiB and a
  2048x2048 matmul, fastest of 5."""
  import jax
  import jax.numpy as jnp
  big = jnp.ones((1 << 28,), jnp.float32)
  read = jax.jit(jnp.sum)
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  t_read, _ = fastest(lambda: read(big), 5)
  t_mm, _ = fastest(lambda: mm(a), 5)
  return big.nbytes / t_read, 2 * 2048 ** 3 / t_mm


def weight_matmuls(model, rows: int):
  """A call that multiplies ``rows`` activations by every projection of ``model`` once, as a decode
  step must (the layers' seven and the output head): what XLA's matmuls alone cost at this batch."""
  import jax
  import jax.numpy as jnp

  layers = model.layers
  kernels = [layers.attn.q_proj, layers.attn.k_proj, layers.attn.v_proj, layers.attn.o_proj,
             layers.mlp.gate_proj, layers.mlp.up_proj, layers.mlp.down_proj]
  count = model.config.num_layers
  # Each stacked kernel [L, in..., out...] as [L, in, out] (o_proj's inputs are its first two axes).
  values = [k[...] for k in kernels]
  flat = [v.reshape(count, -1, v.shape[-1]) if k is layers.attn.o_proj else v.reshape(count, v.shape[1], -1)
          for k, v in zip(kernels, values)]
  head = model.lm_head_kernel()
  inputs = [jnp.ones((rows, w.shape[1]), w.dtype) for w in flat]

  @jax.jit
  def run(flat, head, inputs):
    def layer(i, total):
      return total + sum(jnp.sum(x @ w[i]) for x, w in zip(inputs, flat))
    total = jax.lax.fori_loop(0, count, layer, jnp.float32(0))
    return total + jnp.sum(inputs[0] @ head)

  return lambda: run(flat, head, inputs)


def decode(args):
  import jax
  import torch
  from flax import nnx
  from transformers import AutoModelForCausalLM

  from jalign.models.pretrained import smollm2_path
  from jalign.rollout import generate

  model, _, prompts = smollm2_prompts(8)
  bandwidth, flops = machine_rates()
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  path = smollm2_path()
  ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  torch.set_num_threads(os.cpu_count())
  print(f"SmolLM2-135M float32 on {jax.devices()[0].platform} ({os.cpu_count()} cores): weights {weights / 1e6:.0f} MB, "
        f"measured {bandwidth / 1e9:.1f} GB/s read, {flops / 1e9:.0f} GFLOP/s float32 matmul; "
        f"{args.new} new tokens after prompts of 37-176 tokens")

  def ours(batch, new):
    return lambda: generate(model, batch, max_new_tokens=new, min_new_tokens=new, greedy=True).tokens

  def theirs(batch, new):
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left-padded, as transformers wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])

    def run():
      with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)
    return run

  for rows in (1, 8):
    batch = prompts[:rows] if rows > 1 else prompts[1:2]  # batch 1: the 176-token prompt
    floor = max(weights / bandwidth, 2 * n_params * rows / flops)
    figures = {}
    for name, make in (("jalign", ours), ("transformers", theirs)):
      whole, _ = fastest(make(batch, args.new), args.rounds)
      first, _ = fastest(make(batch, 1), args.rounds)
      figures[name] = (whole, (whole - first) / (args.new - 1))
    (ours_call, ours_step), (ref_call, ref_step) = figures["jalign"], figures["transformers"]
    matmuls, _ = fastest(weight_matmuls(model, rows), args.rounds)
    print(f"  batch {rows}: call {ours_call * 1000:7.0f} ms (transformers {ref_call * 1000:7.0f} ms, "
          f"{ref_call / ours_call:4.2f}x); decode step {ours_step * 1000:5.1f} ms (transformers {ref_step * 1000:5.1f} ms); "
          f"floor {floor * 1000:5.1f} ms: {ours_step / floor:4.2f}x the floor; XLA's matmuls over the weights "
          f"alone {matmuls * 1000:5.1f} ms ({matmuls / floor:4.2f}x the floor)")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("part", choices=("split", "continuous", "decode"))
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--new", type=int, default=None)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--prompts", type=int, default=48)
  p.add_argument("--slots", type=int, default=8)
  args = p.parse_args()
  if args.part == "split":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  defaults = {"split": (24, 3), "continuous": (0, 1), "decode": (64, 2)}[args.part]
  args.new = args.new or defaults[0]
  args.rounds = args.rounds or defaults[1]
  {"split": split, "continuous": continuous, "decode": decode}[args.part](args)


if __name__ == "__main__":
  main()
