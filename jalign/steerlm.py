"""``python -m jalign.steerlm --rm=runs/rm_regression_tiny --input=chats.jsonl --output=labelled.jsonl
[--attributes=correctness,verbosity]``: SteerLM's attribute labels on every assistant turn of chat data,
from a regression reward model (``jalign.recipes.steerlm``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jalign.data import formats
from jalign.data.chat import STEERLM_ATTRIBUTES
from jalign.recipes.build import load_trained, rules_of, tool_mesh
from jalign.recipes.steerlm import annotate
from jalign.specs.base import ConfigError


def main(argv=None):
  p = argparse.ArgumentParser(description="SteerLM's attribute labels from a regression reward model.")
  p.add_argument("--rm", required=True, help="run folder of a regression reward model (algorithm rm)")
  p.add_argument("--input", required=True, help="NeMo chat jsonl to annotate")
  p.add_argument("--output", required=True)
  p.add_argument("--attributes", default="", help="comma-separated names of the model's outputs, in order "
                 f"(default: {','.join(STEERLM_ATTRIBUTES)} for a 9-output model)")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  try:
    mesh = tool_mesh()  # the model sharded over every device of this process
    model, tok, c = load_trained(args.rm, mesh=mesh)
    outputs = model.head.kernel.shape[-1]
    names = args.attributes.split(",") if args.attributes else list(STEERLM_ATTRIBUTES)
    if len(names) != outputs:
      raise ValueError(f"--attributes names {len(names)} attributes; the model in {args.rm} has {outputs} outputs")
    records, report = formats.read_jsonl(Path(args.input), "chat")
    labelled = annotate(records, model, tok, attributes=names, max_length=c.data.max_seq_length,
                        batch_size=args.batch_size, mesh=mesh, rules=rules_of(c))
  except (FileNotFoundError, ValueError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  formats.write_jsonl(args.output, labelled)
  turns = sum(1 for r in labelled for t in r["conversations"] if t["from"] == "Assistant")
  print(f"{args.output}: {len(labelled)} records, {turns} assistant turns labelled "
        f"({report.bad_lines} bad input lines skipped)")


if __name__ == "__main__":
  main()
