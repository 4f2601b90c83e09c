"""Real-size steps on one H100 or H200, in about 8 minutes: Llama-3.2-1B and -3B shapes with random
weights, bf16 compute and float32 master weights, 4096-token packed rows.

  python bench/gpu_scale.py [--out bench/results/gpu_scale.json] [--tiny] [--parts sft-1b,gen-1b,...]

Each part runs in a process of its own (its own peak memory) over the visible devices (one GPU; one CPU
device in the test), built and run by the same builders as ``python -m jalign.train``
(``model.allow_random`` opts in to random weights):
  sft-1b, sft-3b  the SFT train step: tokens/s and MFU, (6 N + attention) FLOPs per token over the
                  card's dense bf16 peak; the planner's peak memory beside the measured peak
                  (``memory_stats()["peak_bytes_in_use"]``)
  dpo-1b          the DPO reference pass and train step, the same figures
  ppo-1b          one PPO step, 1B policy with 1B critic and reward model on the same GPU: generate,
                  refit, log-probs, reward, critic (values and training), train
  gen-1b          generation at batch 1 and 64: tokens/s against the HBM roofline (weights and the valid
                  KV cache read once per new token, over the card's bandwidth)
``--tiny`` runs every part at the tiny preset and 128 tokens on whatever devices there are (a test
runs it on CPU, where there is no peak to compare with). Prints a table and writes the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The card's dense bf16 FLOP/s and HBM bytes/s, by a word of its device kind.
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
PARTS = ("sft-1b", "sft-3b", "dpo-1b", "ppo-1b", "gen-1b")
SHAPES = {"1b": "llama3.2-1b", "3b": "llama3.2-3b"}


def card(device) -> tuple[str, float | None, float | None]:
  kind = getattr(device, "device_kind", "") or device.platform
  for name, (flops, bandwidth) in CARDS.items():
    if name in kind:
      return kind, flops, bandwidth
  return kind, None, None


def quiet(*_):
  pass


def _median(xs):
  return statistics.median(xs) if xs else None


class Shape:
  """The sizes of one run: real (4096 tokens) or ``--tiny`` (the tiny preset, 128 tokens)."""

  def __init__(self, size: str, tiny: bool):
    self.preset = "tiny" if tiny else SHAPES[size]
    self.seq = 128 if tiny else 4096
    self.rows = 2 if tiny else 4
    self.new_tokens = 16 if tiny else 256
    self.prompt = 32 if tiny else 512
    self.ppo_prompts = 8 if tiny else 64
    self.steps = 2 if tiny else 5


def config(name: str, shape: Shape, run_dir: Path, **overrides):
  from jalign.config import load_config_file
  return load_config_file(ROOT / "configs" / f"{name}.py", {
      "run_dir": str(run_dir), "model.init": "random", "model.preset": shape.preset, "model.allow_random": True,
      "model.dtype": "bfloat16", "model.param_dtype": "float32", "model.remat": "full", "tokenizer": "tiny",
      "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.pipeline": 1,
      "data.max_seq_length": shape.seq, "data.validation": "", "train.val_check_interval": 0,
      "train.global_batch_size": shape.rows, "train.micro_batch_size": 1, "train.max_steps": 1000,
      "train.log_every": 1000, **overrides})


def peak_memory() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def planned_peak(c, devices: int) -> int:
  """The planner's peak bytes per device for ``c`` on ``devices`` devices, computed as ``python -m
  jalign.plan`` does: on CPU host devices, in a process of its own."""
  code = ("import json, sys; from jalign import config as C, plan; c = C.read_saved(sys.argv[1]); "
          "print(json.dumps(max(j.peak_bytes for j in plan.plan(c, peak_flops=989e12))))")
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    f.write(c.to_json_best_effort())
  from jalign import plan  # its XLA flags, which python -m jalign.plan sets (importing it starts no backend)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {plan.XLA_FLAGS}")
  out = subprocess.run([sys.executable, "-c", code, f.name], cwd=ROOT, env=env, capture_output=True, text=True)
  os.unlink(f.name)
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-2000:])
  return int(out.stdout.strip().splitlines()[-1])


def timed_steps(loop, batch, steps: int) -> tuple[list[float], object]:
  """Seconds of each of ``steps`` train steps on one device batch (compiled first, not timed)."""
  import jax
  compiled = loop.lower_train_step(batch).compile()
  state, times = loop.state, []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  loop.state = state
  return times[1:], metrics


def train_part(algorithm: str, shape: Shape, run_dir: Path) -> dict:
  import jax
  import numpy as np
  from jalign import metrics as metrics_lib
  from jalign.parallel import mesh as pmesh
  from jalign.recipes import build
  name = {"sft": "sft_tiny", "dpo": "dpo_tiny"}[algorithm]
  c = config(name, shape, run_dir, **{"data.pack": True})
  loop = build.build_trainer(c, log=quiet)
  batch = pmesh.put_batch(next(loop.train_batches), loop.mesh, loop.rules)
  out = {}
  if loop.reference is not None:
    reference = [0.0] * (shape.steps + 1)
    for i in range(shape.steps + 1):
      t0 = time.perf_counter()
      extra = jax.block_until_ready(loop.reference(batch, loop.state))
      reference[i] = time.perf_counter() - t0
    batch = {**batch, **extra}
    out["reference_s"] = _median(reference[1:])
  times, _ = timed_steps(loop, batch, shape.steps)
  step = _median(times)
  tokens = int(np.sum(np.asarray(jax.device_get(batch["segment_ids"])) > 0))
  cfg = build.model_config(c)
  flops = metrics_lib.train_flops_per_token(cfg, shape.seq) * tokens
  kind, peak_flops, _ = card(jax.devices()[0])
  out.update(step_s=step, tokens=tokens, tokens_per_s=tokens / step, params=cfg.num_params,
             mfu=flops / step / peak_flops if peak_flops else None,
             peak_bytes=peak_memory(), planned_peak_bytes=planned_peak(c, jax.device_count()))
  if out["peak_bytes"] and out["planned_peak_bytes"]:
    out["planned_over_measured"] = out["planned_peak_bytes"] / out["peak_bytes"]
  return out


def generation_part(shape: Shape, run_dir: Path) -> dict:
  import jax
  import jax.numpy as jnp
  from jalign.models import LlamaConfig, Transformer
  from jalign.parallel import mesh as pmesh
  from flax import nnx
  from jalign.rollout.generate import generate
  cfg = LlamaConfig.preset(shape.preset, dtype="bfloat16", param_dtype="bfloat16")
  model = pmesh.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), pmesh.make_mesh({"data": -1}))
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  kind, peak_flops, bandwidth = card(jax.devices()[0])
  out = {}
  for batch in (1, 64):
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(shape.prompt)] for i in range(batch)]
    run = lambda: generate(model, prompts, max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens,  # noqa: E731
                           temperature=1.0, stop_ids=(), seed=0)
    jax.block_until_ready(run().tokens)  # compiled
    t0 = time.perf_counter()
    jax.block_until_ready(run().tokens)
    seconds = time.perf_counter() - t0
    # Each new token reads the weights and the valid KV cache once: keys and values of every layer.
    kv_per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    read = sum(weights + batch * kv_per_position * (shape.prompt + i) for i in range(shape.new_tokens))
    floor = read / bandwidth if bandwidth else None
    if floor and peak_flops:  # the prompt's forward pass, at the FLOP/s peak
      floor += 2 * cfg.num_params * batch * shape.prompt / peak_flops
    out[f"batch_{batch}"] = {"seconds": seconds, "tokens_per_s": batch * shape.new_tokens / seconds,
                             "roofline_s": floor, "of_roofline": floor / seconds if floor else None}
  return out


def ppo_part(shape: Shape, run_dir: Path) -> dict:
  import jax
  from jalign.recipes import ppo
  from jalign.train import run
  rm = run_dir / "rm"
  run(config("rm_tiny", shape, rm, **{"train.max_steps": 1, "train.save_interval": 0}), log=quiet)
  c = config("ppo_tiny", shape, run_dir / "ppo", **{
      "critic.init": f"run:{rm}", "critic.reward_model": f"run:{rm}",
      "critic.mesh.data": -1, "critic.mesh.fsdp": 1, "critic.mesh.tensor": 1, "critic.mesh.pipeline": 1,
      "data.max_seq_length": shape.prompt + shape.new_tokens, "rollout.num_prompts": shape.ppo_prompts,
      "rollout.micro_batch_size": shape.ppo_prompts, "rollout.max_new_tokens": shape.new_tokens,
      "train.global_batch_size": shape.ppo_prompts, "critic.global_batch_size": shape.ppo_prompts,
      "critic.micro_batch_size": 1, "train.max_steps": 2, "train.save_interval": 0, "data.validation": ""})
  loop, rollouts = ppo.build(c, log=quiet)
  spans: dict[str, list[float]] = {}

  def timing(owner, attribute, name):
    inner = getattr(owner, attribute)

    def call(*args, **kwargs):
      t0 = time.perf_counter()
      out = jax.block_until_ready(inner(*args, **kwargs))
      spans.setdefault(name, []).append(time.perf_counter() - t0)
      return out
    setattr(owner, attribute, call)

  critic = rollouts.prepare.critic
  timing(rollouts, "engine_ready", "refit")
  timing(rollouts, "_generate", "generate")
  timing(rollouts, "logprobs", "log-probs")
  timing(rollouts, "score", "reward")
  timing(critic, "values", "critic")
  timing(critic, "train", "critic")
  loop.options.save_interval = 0
  summary = loop.run()
  rows = [json.loads(line) for line in (Path(c.run_dir) / "metrics.jsonl").read_text().splitlines()]
  train = [r["step_time"] for r in rows if r["split"] == "train"]
  # The second rollout's spans (the first compiles); a rollout calls each once, the critic twice.
  last = {name: (times[-2] + times[-1] if name == "critic" else times[-1]) for name, times in spans.items()}
  last["generate"] -= last.get("refit", 0.0)
  last["train"] = train[-1]
  return {"steps": summary["steps"], "seconds": last, "rollout_prompts": shape.ppo_prompts,
          "new_tokens": shape.new_tokens, "peak_bytes": peak_memory()}


def run_part(part: str, tiny: bool) -> dict:
  algorithm, size = part.split("-")
  shape = Shape(size, tiny)
  with tempfile.TemporaryDirectory() as tmp:
    if algorithm in ("sft", "dpo"):
      return train_part(algorithm, shape, Path(tmp))
    if algorithm == "gen":
      return generation_part(shape, Path(tmp))
    return ppo_part(shape, Path(tmp))


def _gib(x):
  return f"{x / 2**30:.2f}" if x else "-"


def table(results: dict) -> str:
  lines = [f"device: {results['device']}", "",
           "| part | step s | tokens/s | MFU | measured peak GiB | planned peak GiB | planned/measured |",
           "|---|---|---|---|---|---|---|"]
  for part in ("sft-1b", "sft-3b", "dpo-1b"):
    r = results["parts"].get(part)
    if not r or "error" in r:
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    ratio = f"{r['planned_over_measured']:.2f}" if r.get("planned_over_measured") else "-"
    ref = f" (+{r['reference_s']:.3f} reference)" if r.get("reference_s") else ""
    lines.append(f"| {part} | {r['step_s']:.3f}{ref} | {r['tokens_per_s']:,.0f} | {mfu} | {_gib(r['peak_bytes'])} "
                 f"| {_gib(r['planned_peak_bytes'])} | {ratio} |")
  gen = results["parts"].get("gen-1b")
  if gen and "error" not in gen:
    lines += ["", "| generation | tokens/s | seconds | roofline s | of roofline |", "|---|---|---|---|---|"]
    for batch, r in ((k, v) for k, v in gen.items() if k.startswith("batch_")):
      share = f"{100 * r['of_roofline']:.1f}%" if r.get("of_roofline") else "-"
      roof = f"{r['roofline_s']:.3f}" if r.get("roofline_s") else "-"
      lines.append(f"| {batch} | {r['tokens_per_s']:,.0f} | {r['seconds']:.3f} | {roof} | {share} |")
  ppo_result = results["parts"].get("ppo-1b")
  if ppo_result and "error" not in ppo_result:
    s = ppo_result["seconds"]
    lines += ["", "| PPO step | " + " | ".join(s) + " |", "|---" * (len(s) + 1) + "|",
              "| seconds | " + " | ".join(f"{v:.3f}" for v in s.values()) + " |"]
  for part, r in results["parts"].items():
    if "error" in r:
      lines.append(f"{part}: failed: {r['error'].strip().splitlines()[-1]}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_scale.json"))
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--part", help=argparse.SUPPRESS)  # one part, in this process (the parent's child)
  args = p.parse_args()
  if args.part:
    import jax
    print(json.dumps({**run_part(args.part, args.tiny), "device": card(jax.devices()[0])[0]}))
    return
  # This process never starts a backend: each part's process has the GPU to itself.
  results = {"device": None, "tiny": args.tiny, "parts": {}}
  for part in args.parts.split(","):
    began = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--part", part] + (["--tiny"] if args.tiny else []),
                          capture_output=True, text=True)
    if done.returncode == 0:
      results["parts"][part] = json.loads(done.stdout.strip().splitlines()[-1])
      results["device"] = results["parts"][part].pop("device")
    else:
      results["parts"][part] = {"error": done.stderr[-3000:]}
    results["parts"][part]["wall_s"] = time.perf_counter() - began
    print(f"{part}: {time.perf_counter() - began:.0f} s", flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(results, indent=2))
  print(table(results))
  if any("error" in r for r in results["parts"].values()):
    sys.exit(1)


if __name__ == "__main__":
  main()
