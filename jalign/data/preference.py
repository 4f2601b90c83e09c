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
from jalign.data.packing import build_row, first_fit
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


def plan_pair_rows(pairs: list[Pair], length: int, *, pack: bool) -> list[list[int]]:
  """Which pairs share each row: one per row, or first-fit packed by their chosen + rejected length."""
  if not pack:
    return [[i] for i in range(len(pairs))]
  return first_fit([len(p.chosen) + len(p.rejected) for p in pairs], length)


def pairs_row(pairs: list[Pair], length: int, pad_id: int, max_pairs: int) -> dict:
  """Pairs laid out in one row as chosen_1, rejected_1, chosen_2, ... (segments 1, 2, 3, ...).

  Besides the row fields (tokens, targets, loss_mask, positions, segment_ids ``[length]``) it holds
  ``pair_mask``, ``chosen_reward`` and ``rejected_reward`` ``[max_pairs]``: pair p's chosen response
  is segment 2p+1 and its rejected one 2p+2, and unused slots have ``pair_mask`` 0. One pair per row
  is the unpacked layout (row length 2 x the longest sequence), several the packed one.
  """
  if len(pairs) > max_pairs:
    raise ValueError(f"{len(pairs)} pairs do not fit a row of at most {max_pairs}")
  row = build_row([ex for p in pairs for ex in (p.chosen, p.rejected)], length, pad_id)
  slots = np.zeros(max_pairs, np.float32)
  slots[:len(pairs)] = 1.0
  chosen = np.zeros(max_pairs, np.float32)
  rejected = np.zeros(max_pairs, np.float32)
  chosen[:len(pairs)] = [p.chosen_reward for p in pairs]
  rejected[:len(pairs)] = [p.rejected_reward for p in pairs]
  return {**row, "pair_mask": slots, "chosen_reward": chosen, "rejected_reward": rejected}


def feedback_row(feedback: Feedback, length: int, pad_id: int) -> dict:
  return {**build_row([feedback.example], length, pad_id), "desirable": np.bool_(feedback.desirable)}
