"""SteerLM's annotation step: score every assistant turn with a trained regression reward model and write
the attribute label strings that attribute-conditioned SFT trains on.

  python -m jalign.steerlm --rm=runs/rm_regression_tiny --input=chats.jsonl --output=labelled.jsonl \
      [--attributes=correctness,verbosity]

For each assistant turn, the conversation up to and including that turn is rendered as the reward
model's training texts are (NeMo-Aligner chat format, ``<extra_id_N>`` tokens, ending with the next
turn's start) and scored at its last token; the scores are rounded and clipped to 0..4 (HelpSteer's
scale) and written as ``quality:4,...,verbosity:2`` (``data.chat.steerlm_label``) in the turn's
``label``. Records come out with ``type: VALUE_TO_TEXT``, so an SFT config with ``data.format = "chat"``
and ``data.chat_prompt_tokens = "extra_id"`` trains on them with the labels in the (masked) prompt.
A turn whose text is too long for the model's ``max_seq_length`` keeps its left end cut off.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

from jalign import config as config_lib
from jalign import train
from jalign.data import formats
from jalign.data.chat import STEERLM_ATTRIBUTES, NemoChatFormat, steerlm_label
from jalign.data.sft import Example
from jalign.score import last_token_values


def turn_texts(record: dict, chat_format: NemoChatFormat) -> list[tuple[int, str]]:
  """``(turn index, text)`` for every assistant turn: the conversation up to it, rendered without labels."""
  plain = {k: v for k, v in record.items() if k != "type"}
  out = []
  for i, turn in enumerate(record["conversations"]):
    if turn["from"] == "Assistant":
      prefix = dict(plain, conversations=[{k: v for k, v in t.items() if k != "label"}
                                          for t in record["conversations"][:i + 1]])
      out.append((i, chat_format.render_text(prefix)))
  return out


def annotate(records: list[dict], model, tok, *, attributes: list[str], max_length: int, batch_size: int = 8,
             chat_format: NemoChatFormat | None = None, low: float = 0.0, high: float = 4.0) -> list[dict]:
  """Copies of chat ``records`` with a SteerLM label on every assistant turn (see the module docstring)."""
  chat_format = chat_format or NemoChatFormat.extra_id()
  if len(attributes) != model.head.kernel.shape[-1]:
    raise ValueError(f"{len(attributes)} attribute names for a reward model of {model.head.kernel.shape[-1]} outputs")
  jobs = [(r, i, text) for r, rec in enumerate(records) for i, text in turn_texts(rec, chat_format)]

  examples = []
  for _, _, text in jobs:
    ids = tok.encode(text, add_special_tokens=False)[-max_length:]
    examples.append(Example(np.asarray(ids, np.int32), np.zeros(len(ids), bool)))
  scores = last_token_values(model, tok, examples, max_length=max_length, batch_size=batch_size)
  out = copy.deepcopy(records)
  for (r, i, _), values in zip(jobs, scores):
    clipped = {name: float(np.clip(np.round(v), low, high)) for name, v in zip(attributes, values)}
    out[r]["conversations"][i]["label"] = steerlm_label(clipped)
  for rec in out:
    rec["type"] = "VALUE_TO_TEXT"
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rm", required=True, help="run folder of a regression reward model (algorithm rm)")
  p.add_argument("--input", required=True, help="NeMo chat jsonl to annotate")
  p.add_argument("--output", required=True)
  p.add_argument("--attributes", default="", help="comma-separated names of the model's outputs, in order "
                 f"(default: {','.join(STEERLM_ATTRIBUTES)} for a 9-output model)")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  try:
    model, tok, c = train.load_trained(args.rm)
    outputs = model.head.kernel.shape[-1]
    names = args.attributes.split(",") if args.attributes else list(STEERLM_ATTRIBUTES)
    if len(names) != outputs:
      raise ValueError(f"--attributes names {len(names)} attributes; the model in {args.rm} has {outputs} outputs")
    records, report = formats.read_jsonl(Path(args.input), "chat")
    labelled = annotate(records, model, tok, attributes=names, max_length=c.data.max_seq_length,
                        batch_size=args.batch_size)
  except (FileNotFoundError, ValueError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  formats.write_jsonl(args.output, labelled)
  turns = sum(1 for r in labelled for t in r["conversations"] if t["from"] == "Assistant")
  print(f"{args.output}: {len(labelled)} records, {turns} assistant turns labelled "
        f"({report.bad_lines} bad input lines skipped)")


if __name__ == "__main__":
  main()
