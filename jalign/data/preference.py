"""Preference data: comparison pairs (RM, DPO family) and KTO's unpaired feedback, tokenized.

A prompt is a string with the chat template already applied, or a list of ``{"role", "content"}``
messages rendered with NeMo-Aligner's chat format (ending in ``<turn>Assistant\\n``). The prompt is
tokenized on its own and the response after it, so the prompt's tokens are always a prefix of the
full sequence; the loss mask covers the response only. Responses to string prompts end with EOS;
responses to message prompts end with ``end_of_turn`` and the next ``turn_start``, as in SFT.

Too long: the prompt loses tokens from its left end (the part farthest from the response); a pair
or example whose response alone does not fit is dropped. Both are counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jalign.data.chat import NemoChatFormat
from jalign.data.packing import build_row
from jalign.data.sft import EncodeStats, Example, _example
from jalign.data.tokenizer import Tokenizer

_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclasses.dataclass(frozen=True)
class Pair:
  chosen: Example
  rejected: Example
  chosen_reward: float
  rejected_reward: float


@dataclasses.dataclass(frozen=True)
class Feedback:
  example: Example
  desirable: bool


def render_prompt(prompt, chat_format: NemoChatFormat) -> tuple[str, bool]:
  """``(text, is_chat)``: message lists become a NeMo chat ending with the assistant's turn."""
  if isinstance(prompt, str):
    return prompt, False
  system = "".join(m["content"] for m in prompt if m["role"] == "system")
  turns = [{"from": _ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in prompt if m["role"] != "system"]
  record = {"system": system, "conversations": turns, "mask": "User,Assistant"}
  return chat_format.render_text(record, add_generation_prompt=True), True


def encode_response(prompt, response: str, tok: Tokenizer, *, max_length: int, chat_format: NemoChatFormat,
                    add_eos: bool = True):
  """``(Example or None, truncated)`` for one prompt and response."""
  text, is_chat = render_prompt(prompt, chat_format)
  prompt_ids = tok.encode(text, add_special_tokens=False)
  if is_chat:
    response_ids = tok.encode(response + chat_format.end_of_turn + chat_format.turn_start, add_special_tokens=False)
  else:
    response_ids = tok.encode(response, add_special_tokens=False)
    if add_eos and tok.eos_id is not None:
      response_ids.append(tok.eos_id)
  truncated = len(prompt_ids) + len(response_ids) > max_length
  if truncated:
    keep = max_length - len(response_ids)
    if keep < 1:
      return None, True
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
  return _example([(prompt_ids, False), (response_ids, True)]), truncated


def encode_pairs(records: list[dict], tok: Tokenizer, *, max_length: int,
                 chat_format: NemoChatFormat | None = None, add_eos: bool = True,
                 over_length: str = "truncate") -> tuple[list[Pair], EncodeStats]:
  """Tokenized pairs. ``over_length``: "truncate" (cut the prompt's left end; drop a pair whose
  response alone does not fit) or "drop" (drop every pair that does not fit). Both are counted."""
  if over_length not in ("truncate", "drop"):
    raise ValueError(f"over_length must be 'truncate' or 'drop', got {over_length!r}")
  chat_format = chat_format or NemoChatFormat()
  stats = EncodeStats()
  pairs = []
  for rec in records:
    chosen, cut_c = encode_response(rec["prompt"], rec["chosen_response"], tok, max_length=max_length,
                                    chat_format=chat_format, add_eos=add_eos)
    rejected, cut_r = encode_response(rec["prompt"], rec["rejected_response"], tok, max_length=max_length,
                                      chat_format=chat_format, add_eos=add_eos)
    if chosen is None or rejected is None or (over_length == "drop" and (cut_c or cut_r)):
      stats.dropped += 1
      continue
    stats.keep(chosen, rejected, truncated=cut_c or cut_r)
    pairs.append(Pair(chosen, rejected, rec["chosen_reward"], rec["rejected_reward"]))
  return pairs, stats


def encode_feedback(records: list[dict], tok: Tokenizer, *, max_length: int,
                    chat_format: NemoChatFormat | None = None, add_eos: bool = True) -> tuple[list[Feedback], EncodeStats]:
  chat_format = chat_format or NemoChatFormat()
  stats = EncodeStats()
  out = []
  for rec in records:
    ex, cut = encode_response(rec["prompt"], rec["response"], tok, max_length=max_length,
                              chat_format=chat_format, add_eos=add_eos)
    if ex is None:
      stats.dropped += 1
      continue
    stats.keep(ex, truncated=cut)
    out.append(Feedback(ex, rec["desirable"]))
  return out, stats


def pair_row(pair: Pair, length: int, pad_id: int) -> dict:
  """One comparison as ``{"chosen": row, "rejected": row, "chosen_reward", "rejected_reward"}``."""
  return {"chosen": build_row([pair.chosen], length, pad_id), "rejected": build_row([pair.rejected], length, pad_id),
          "chosen_reward": np.float32(pair.chosen_reward), "rejected_reward": np.float32(pair.rejected_reward)}


def feedback_row(feedback: Feedback, length: int, pad_id: int) -> dict:
  return {**build_row([feedback.example], length, pad_id), "desirable": np.bool_(feedback.desirable)}
