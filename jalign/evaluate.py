"""``python -m jalign.evaluate --run=runs/grpo_tiny --data=bundled:arithmetic_val.jsonl [--samples=4]
[--temperature=1.0] [--greedy] [--max_new_tokens=32] [--reward_functions=module:function,...]``:
held-out accuracy of a trained policy on problem data. ``--run`` also takes a model a config's
``model.init`` names (``smollm2``, ``hf:<folder>``, ``gguf:<file>``), prompted in its own chat template:
the accuracy before training.

Each prompt of the ``problem`` jsonl (``prompt``/``messages``/``problem`` with ``answer``/
``expected_answer``) is rendered in the run's chat format and answered ``--samples`` times (or once,
greedily); every answer is scored by the reward functions (default: the math verifier,
``jalign.rewards.math_answers:final_answer``) and counts as correct when its reward is at least
``--threshold`` (1). Printed and written to ``<run>/eval_<data name>.json``: pass@1 (the mean fraction of
correct samples per prompt) and pass@k for k = 1..samples by the unbiased estimator of Chen et al.
(2021), ``1 - C(n - c, k) / C(n, k)`` per prompt with c of n samples correct (beside a model that is
not a run folder: ``eval_<data name>.json`` in the working directory).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from jalign import config as config_lib
from jalign.data import formats
from jalign.data.chat import stop_ids, without_stop
from jalign.data.preference import render_prompt
from jalign.recipes.build import build_model, build_tokenizer, load_trained, read_run_config, rules_of, tool_mesh
from jalign.rewards import functions
from jalign.rollout import generate
from jalign.specs.base import ConfigError, message_format


def pass_at_k(n: int, c: int, k: int) -> float:
  """The chance that at least one of k of the n samples (c of them correct) is correct."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def is_run_folder(run: str) -> bool:
  """Whether ``--run`` names a jalign run folder rather than a model (which then has no folder to write to)."""
  return (Path(run) / "config.json").is_file()


def policy(run: str):
  """``(model, tokenizer, chat format)`` of run folder ``run``, or of the model ``run`` names as a
  config's ``model.init`` would (in the tokenizer's own chat template when it has one)."""
  if is_run_folder(run):
    saved = read_run_config(run)
    model, tok, _ = load_trained(run, mesh=tool_mesh())
    return model, tok, message_format(saved, tok)
  c = config_lib.base_config()
  c.model.init, c.tokenizer = run, "model"
  mesh = tool_mesh()
  model, own = build_model(c, mesh, rules_of(c))
  tok = build_tokenizer(c, own)
  c.data.chat_template = "model" if tok.chat_template is not None else "nemo"
  return model, tok, message_format(c, tok)


def evaluate(run: str, data: str, *, samples: int = 1, temperature: float = 1.0, greedy: bool = False,
             max_new_tokens: int = 32, reward_functions: str = "jalign.rewards.math_answers:final_answer",
             threshold: float = 1.0, batch_size: int = 64, seed: int = 0, log=print) -> dict:
  """The accuracy summary of run folder ``run`` on problem file ``data`` (see the module docstring),
  with every answer under ``"answers"``."""
  model, tok, chat = policy(run)
  path = config_lib.data_path(data)
  records, report = formats.read_jsonl(path, "problem")
  prompts = [tok.encode(render_prompt(r["prompt"], chat)[0], add_special_tokens=False) for r in records]
  stops = stop_ids(chat, tok)
  pad = tok.pad_id if tok.pad_id is not None else 0
  n = 1 if greedy else samples
  flat = [(i, j) for i in range(len(prompts)) for j in range(n)]
  width = max(len(p) for p in prompts)
  responses = []
  for start in range(0, len(flat), batch_size):
    chunk = flat[start:start + batch_size]
    out = generate(model, [prompts[i] for i, _ in chunk], prompt_ids=np.asarray([i * n + j for i, j in chunk]),
                   max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, stop_ids=stops,
                   pad_id=pad, seed=seed, prompt_width=width)
    responses += [without_stop(r, stops) for r in out.responses()]
  named = [functions.parse(s) for s in reward_functions.split(",") if s.strip()]
  pool = functions.RewardPool(named, log=log)
  try:
    items = [functions.Item(tok.decode(prompts[i]), tok.decode(resp), records[i]["record"],
                            f"{path}:{report.lines[i]}") for (i, _), resp in zip(flat, responses)]
    rewards, _ = pool.score(items)
  finally:
    pool.close()
  correct = (np.asarray(rewards) >= threshold).reshape(len(prompts), n)
  counts = correct.sum(axis=1)
  summary = {"run": str(run), "data": str(path), "prompts": len(prompts), "samples": n, "greedy": greedy,
             "temperature": None if greedy else temperature, "max_new_tokens": max_new_tokens,
             "pass@1": float(correct.mean())}
  for k in range(2, n + 1):
    summary[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
  summary["answers"] = [{"where": item.where, "response": item.response, "reward": r}
                        for item, r in zip(items, rewards)]
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(description="Held-out accuracy of a trained policy on problem data.")
  p.add_argument("--run", required=True, help="a jalign run folder, or a model: smollm2, hf:<folder>, gguf:<file>")
  p.add_argument("--data", required=True, help="problem jsonl (a path or bundled:<name>)")
  p.add_argument("--samples", type=int, default=1, help="answers per prompt (pass@k for k up to this)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--greedy", action="store_true", help="one greedy answer per prompt")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--reward_functions", default="jalign.rewards.math_answers:final_answer")
  p.add_argument("--threshold", type=float, default=1.0, help="the reward an answer needs to count as correct")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    if args.samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0:
      raise ConfigError("--samples and --max_new_tokens must be at least 1 and --temperature positive")
    summary = evaluate(args.run, args.data, samples=args.samples, temperature=args.temperature,
                       greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                       reward_functions=args.reward_functions, threshold=args.threshold, seed=args.seed)
  except (FileNotFoundError, ValueError, ConfigError, functions.RewardError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  folder = Path(args.run) if is_run_folder(args.run) else Path(".")
  out = folder / f"eval_{Path(summary['data']).stem}.json"
  out.write_text(json.dumps(summary, indent=1) + "\n")
  scores = " ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("pass@"))
  print(f"{summary['data']}: {summary['prompts']} prompts x {summary['samples']} "
        f"{'greedy answer' if args.greedy else 'samples'}: {scores}; answers in {out}")


if __name__ == "__main__":
  main()
