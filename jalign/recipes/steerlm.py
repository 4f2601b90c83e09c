"""SteerLM's annotation step: every assistant turn scored with a trained regression reward model, and
the attribute label strings that attribute-conditioned SFT trains on.

For each assistant turn, the conversation up to and including that turn is rendered as the reward
model's training texts are (NeMo-Aligner chat format, ``<extra_id_N>`` tokens, ending with the next
turn's start) and scored at its last token; the scores are rounded and clipped to 0..4 (HelpSteer's
scale) and written as ``quality:4,...,verbosity:2`` (``data.chat.steerlm_label``) in the turn's
``label``. Records come out with ``type: VALUE_TO_TEXT``, so an SFT config with ``data.format = "chat"``
and ``data.chat_prompt_tokens = "extra_id"`` trains on them with the labels in the (masked) prompt.
A turn whose text is too long for the model's ``max_seq_length`` keeps its left end cut off.
"""

from __future__ import annotations

import copy

import numpy as np

from jalign.data.chat import NemoChatFormat, steerlm_label
from jalign.data.sft import Example
from jalign.parallel import mesh as pmesh
from jalign.recipes.reward import last_token_values


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
             chat_format: NemoChatFormat | None = None, low: float = 0.0, high: float = 4.0, mesh=None,
             rules=pmesh.DEFAULT_RULES) -> list[dict]:
  """Copies of chat ``records`` with a SteerLM label on every assistant turn (see the module docstring);
  ``mesh``: the one the model is placed on, whose data-parallel groups split the rows."""
  chat_format = chat_format or NemoChatFormat.extra_id()
  if len(attributes) != model.head.kernel.shape[-1]:
    raise ValueError(f"{len(attributes)} attribute names for a reward model of {model.head.kernel.shape[-1]} outputs")
  jobs = [(r, i, text) for r, rec in enumerate(records) for i, text in turn_texts(rec, chat_format)]

  examples = []
  for _, _, text in jobs:
    ids = tok.encode(text, add_special_tokens=False)[-max_length:]
    examples.append(Example(np.asarray(ids, np.int32), np.zeros(len(ids), bool)))
  scores = last_token_values(model, tok, examples, max_length=max_length, batch_size=batch_size, mesh=mesh,
                             rules=rules)
  out = copy.deepcopy(records)
  for (r, i, _), values in zip(jobs, scores):
    clipped = {name: float(np.clip(np.round(v), low, high)) for name, v in zip(attributes, values)}
    out[r]["conversations"][i]["label"] = steerlm_label(clipped)
  for rec in out:
    rec["type"] = "VALUE_TO_TEXT"
  return out
