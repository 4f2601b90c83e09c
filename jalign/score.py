"""``python -m jalign.score --rm=runs/rm_tiny --input=pairs.jsonl --output=scored.jsonl
[--fit_standardization] [--attribute_weights=0,0,0,0,1,0,0,0,0]``: a reward model's rewards for
comparison data.

The input is ``comparison`` jsonl; each record comes out with ``chosen_reward`` and
``rejected_reward`` (what DPO's ``rpo_*`` losses read), encoded as the reward model's training pairs
were (its chat format; a prompt too long loses its left end; a response that alone does not fit gets
``null``). ``--fit_standardization`` computes the mean and std over every response of the input and
writes the run's ``reward_standardization.json``, so that later inference (this command, the reward
model of PPO and REINFORCE) gives rewards of mean 0 and std 1 on such data. A multi-attribute
(regression) model's outputs are merged by ``attribute_weights`` (default uniform). The model is read
sharded over every device of the process; ``--batch-size`` rows (a multiple of the devices) are scored
at a time. The scoring itself is ``jalign.recipes.reward``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jalign.data import formats
from jalign.recipes.build import tool_mesh
from jalign.recipes.reward import STANDARDIZATION_FILE, RewardModel, score_comparisons, write_standardization
from jalign.specs.base import ConfigError


def main(argv=None):
  p = argparse.ArgumentParser(description="A reward model's rewards for comparison data.")
  p.add_argument("--rm", required=True, help="run folder of a reward model (algorithm rm)")
  p.add_argument("--input", required=True, help="comparison jsonl: prompt, chosen_response, rejected_response")
  p.add_argument("--output", required=True)
  p.add_argument("--fit_standardization", action="store_true",
                 help=f"fit mean and std on these responses and write {STANDARDIZATION_FILE} in the run folder")
  p.add_argument("--attribute_weights", default="", help="comma-separated weights merging a multi-attribute model")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  try:
    weights = [float(w) for w in args.attribute_weights.split(",")] if args.attribute_weights else None
    reward_model = RewardModel.load(args.rm, attribute_weights=weights, mesh=tool_mesh())
    records, report = formats.read_jsonl(Path(args.input), "comparison")
    scored, summary = score_comparisons(reward_model, records, fit_standardization=args.fit_standardization,
                                        batch_size=args.batch_size)
  except (FileNotFoundError, ValueError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  formats.write_jsonl(args.output, scored)
  if args.fit_standardization:
    path = write_standardization(args.rm, summary["mean"], summary["std"], fitted_on=str(args.input),
                                 responses=summary["responses"])
    print(f"{path}: mean {summary['mean']:.4f}, std {summary['std']:.4f}")
  print(f"{args.output}: {summary['pairs_scored']} pairs scored, {summary['skipped']} skipped; "
        f"chosen above rejected in {summary['accuracy']:.1%}")


if __name__ == "__main__":
  main()
