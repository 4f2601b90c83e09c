"""End-to-end training on one GPU with the tiny configs, in bf16 compute, on the GPU's default kernels.

  python bench/gpu_train_smoke.py [--out gpu_train_smoke.json] [--runs runs_gpu] [--steps-scale 1.0]

A chain of short runs, each from the one before as the real recipes go: SFT, a reward model, DPO
from the SFT model, REINFORCE from the SFT model scored by the reward model, PPO with a critic started
from the reward model, and SPIN (one iteration).
Each run goes through ``jalign.train.run`` exactly as ``python -m jalign.train`` does, so on a GPU
it takes cuDNN attention, the Pallas decode kernel in the rollouts and the chunked log-prob. Prints,
and writes to a JSON file, each run's steps, wall time (compilation included), median step time
after the first 5 steps and first and last loss. Not a speed benchmark: the tiny model is far too
small to keep a GPU busy. Runs on CPU too (slowly), to check the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jalign import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def chain(runs: Path, scale: float):
  """(label, config name, overrides) in the order they must run."""
  steps = lambda n: max(2, int(n * scale))
  sft, rm = f"run:{runs / 'sft'}", f"run:{runs / 'rm'}"
  return [
      ("sft", "sft_tiny", {"train.max_steps": steps(200)}),
      ("rm", "rm_tiny", {"train.max_steps": steps(100)}),
      ("dpo", "dpo_tiny", {"model.init": sft, "train.max_steps": steps(50)}),
      ("reinforce", "reinforce_tiny", {"model.init": sft, "reinforce.reward_model": rm,
                                       "train.max_steps": steps(16)}),
      ("ppo", "ppo_tiny", {"model.init": sft, "critic.init": rm, "critic.reward_model": rm,
                           "train.max_steps": steps(16)}),
      ("spin", "spin_tiny", {"model.init": sft, "spin.iterations": 1}),
  ]


def apply(c, label, overrides, runs):
  with c.unlocked() if hasattr(c, "unlocked") else _noop():
    c.run_dir = str(runs / label)
    c.model.dtype = "bfloat16"
    for key, value in overrides.items():
      node = c
      *path, leaf = key.split(".")
      for part in path:
        node = node[part]
      node[leaf] = value
  return c


class _noop:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def summarise(run_dir: Path) -> dict:
  rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
  train_rows = [r for r in rows if "loss" in r and r.get("split", "train") == "train"]
  out = {"logged_rows": len(rows)}
  if train_rows:
    out.update(first_loss=train_rows[0]["loss"], last_loss=train_rows[-1]["loss"])
  times = [r["step_time"] for r in train_rows[5:] if "step_time" in r]
  if times:
    out["median_step_s"] = statistics.median(times)
  rollouts = [r for r in rows if r.get("split") == "rollout"]
  if rollouts:
    out.update(first_reward=rollouts[0].get("reward"), last_reward=rollouts[-1].get("reward"))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_train_smoke.json")
  parser.add_argument("--runs", default="runs_gpu")
  parser.add_argument("--steps-scale", type=float, default=1.0)
  parser.add_argument("--only", default=None, help="comma-separated labels (the runs they start from must exist)")
  args = parser.parse_args()
  runs = Path(args.runs).absolute()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  report = {"device": device.device_kind, "jax": jax.__version__, "runs": []}
  for label, name, overrides in chain(runs, args.steps_scale):
    if args.only and label not in args.only.split(","):
      continue
    row = {"run": label, "config": name}
    start = time.time()
    try:
      c = apply(load_config(name), label, overrides, runs)
      summary = train.run(c, log=lambda *a: None)
      row.update(steps=summary.get("steps"), stopped=summary.get("stopped"))
    except Exception as e:  # report and go on with the runs that do not need this one
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      traceback.print_exc(limit=6)
    row["wall_s"] = time.time() - start
    run_dir = runs / label
    if (run_dir / "iteration_1").exists():  # SPIN: one DPO run folder per iteration
      run_dir = run_dir / "iteration_1"
    if run_dir.exists():
      row.update(summarise(run_dir))
    report["runs"].append(row)
    print("  ", json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
