"""Preference data: comparison pairs (RM, DPO family) and KTO's unpaired feedback, tokenized.

A prompt is a string with the chat template already applied, or a list of ``{"role", "content"}``
messages rendered with NeMo-Aligner's chat format (ending in ``<turn>Assistant\\n``) or, with
``data.chat_template = "model"``, the tokenizer's own template. The prompt is
tokenized on its own and the response after it, so the prompt's tokens are always a prefix of the
full sequence; the loss mask covers the response only. Responses to string prompts end with EOS;
responses to message prompts end with ``end_of_turn`` and the next ``turn_start``, as in SFT.

Too long: the prompt loses tokens from its left end (the part farthest from the response); a pair
or example whose response alone does not fit is dropped. Both are counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jalign.data.chat import ModelChatTemplate, NemoChatFormat
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

  def __len__(self):
    return len(self.chosen) + len(self.rejected)


@dataclasses.dataclass(frozen=True)
class Feedback:
  example: Example
  desirable: bool


def render_prompt(prompt, chat_format: NemoChatFormat | ModelChatTemplate, *,
                  label: str | None = None) -> tuple[str, bool]:
  """``(text, is_chat)``: message lists become a NeMo chat ending with the assistant's turn (and its
  attribute ``label``, SteerLM's conditioning, when given), or the model's own template's prompt."""
  if isinstance(prompt, str):
    return prompt, False
  if isinstance(chat_format, ModelChatTemplate):
    return chat_format.prompt_text(prompt, label), True
  system = "".join(m["content"] for m in prompt if m["role"] == "system")
  turns = [{"from": _ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in prompt if m["role"] != "system"]
  record = {"system": system, "conversations": turns, "mask": "User,Assistant"}
  return chat_format.render_text(record, add_generation_prompt=True, generation_label=label), True


def encode_response(prompt, response: str, tok: Tokenizer, *, max_length: int,
                    chat_format: NemoChatFormat | ModelChatTemplate,
                    add_eos: bool = True, label: str | None = None):
  """``(Example or None, truncated)`` for one prompt and response."""
  text, is_chat = render_prompt(prompt, chat_format, label=label)
  prompt_ids = tok.encode(text, add_special_tokens=False)
  if is_chat and isinstance(chat_format, ModelChatTemplate):
    response_ids = tok.encode(chat_format.reply_text(prompt, response), add_special_tokens=False)
  elif is_chat:
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


def _slots_row(slots: list[tuple[Example, Example]], length: int, pad_id: int, max_slots: int, **per_slot) -> dict:
  """Slots of two sequences each in one row: slot p is segments 2p+1 and 2p+2. Per-slot values
  (``[max_slots]`` float32, 0 in unused slots) and ``pair_mask`` (1 for used slots) come with the row."""
  if len(slots) > max_slots:
    raise ValueError(f"{len(slots)} pairs do not fit a row of at most {max_slots}")
  row = build_row([ex for pair in slots for ex in pair], length, pad_id)
  return {**row, **_slot_fields(len(slots), max_slots, "pair_mask", **per_slot)}


def _slot_fields(used: int, max_slots: int, mask_name: str, **per_slot) -> dict:
  """``[max_slots]`` float32 fields of a row: ``mask_name`` 1 for the ``used`` slots, and each
  ``per_slot`` value list in them, 0 elsewhere."""
  out = {}
  for name, values in {mask_name: np.ones(used), **per_slot}.items():
    out[name] = np.zeros(max_slots, np.float32)
    out[name][:used] = values
  return out


def pairs_row(pairs: list[Pair], length: int, pad_id: int, max_pairs: int) -> dict:
  """Pairs laid out in one row as chosen_1, rejected_1, chosen_2, ... (segments 1, 2, 3, ...).

  Besides the row fields (tokens, targets, loss_mask, positions, segment_ids ``[length]``) it holds
  ``pair_mask``, ``chosen_reward`` and ``rejected_reward`` ``[max_pairs]``: pair p's chosen response
  is segment 2p+1 and its rejected one 2p+2, and unused slots have ``pair_mask`` 0. One pair per row
  is the unpacked layout (row length 2 x the longest sequence), several the packed one.
  """
  return _slots_row([(p.chosen, p.rejected) for p in pairs], length, pad_id, max_pairs,
                    chosen_reward=[p.chosen_reward for p in pairs], rejected_reward=[p.rejected_reward for p in pairs])


@dataclasses.dataclass(frozen=True)
class KTOItem:
  example: Example     # the prompt and its own response
  kl_example: Example  # the same prompt with another sample's response, for the KL estimate
  desirable: bool

  def __len__(self):
    return len(self.example) + len(self.kl_example)


def kto_items(feedback: list[Feedback], *, max_length: int) -> list[KTOItem]:
  """Each sample with its mismatched KL sample: prompt i with the response of sample i+1 (wrapping),
  NeMo-Aligner's pairing, made over the dataset's order. A KL sample too long for ``max_length``
  loses tokens from its prompt's left end."""
  items = []
  for i, fb in enumerate(feedback):
    other = feedback[(i + 1) % len(feedback)].example
    prompt = fb.example.tokens[~fb.example.loss_mask]
    response = other.tokens[other.loss_mask]
    prompt = prompt[max(0, len(prompt) + len(response) - max_length):]
    items.append(KTOItem(fb.example, _example([(list(prompt), False), (list(response), True)]), fb.desirable))
  return items


def shared_prompt_length(pair: Pair) -> int:
  """Tokens the chosen and rejected sequences share before either response's first trained token."""
  c, r = pair.chosen, pair.rejected
  n = min(int(np.argmax(c.loss_mask)) if c.loss_mask.any() else len(c),
          int(np.argmax(r.loss_mask)) if r.loss_mask.any() else len(r))
  differ = np.flatnonzero(c.tokens[:n] != r.tokens[:n])
  return int(differ[0]) if differ.size else n


def shared_pair_length(pair: Pair) -> int:
  """Tokens a pair takes in a shared-prompt row: the prompt once, plus each response after it (each
  branch repeats the prompt's last token, whose hidden state predicts the response's first token)."""
  return len(pair) - max(shared_prompt_length(pair) - 1, 0)


def shared_pairs_row(pairs: list[Pair], length: int, pad_id: int, max_pairs: int) -> dict:
  """Pairs with their prompt computed once. Pair p is segment p+1: its prompt but the last token
  (``branch_ids`` 0), then that last token and the chosen response (branch 1), then the same token and
  the rejected response (branch 2); both branches continue the prompt's positions and see the prompt
  and themselves only. ``response_ids`` number the responses 2p+1 (chosen) and 2p+2 (rejected) like
  ``pairs_row``'s segments, for the per-response sums; the per-pair fields are ``pairs_row``'s."""
  if len(pairs) > max_pairs:
    raise ValueError(f"{len(pairs)} pairs do not fit a row of at most {max_pairs}")
  fields = {name: np.zeros(length, np.int32) for name in ("tokens", "targets", "positions", "segment_ids",
                                                           "branch_ids", "response_ids")}
  fields["tokens"][:] = pad_id
  fields["targets"][:] = pad_id
  fields["loss_mask"] = np.zeros(length, np.float32)
  start = 0
  for i, pair in enumerate(pairs):
    shared = max(shared_prompt_length(pair) - 1, 0)
    parts = [(pair.chosen.tokens[:shared], np.zeros(shared, bool), 0, 0, 0)]
    for branch, ex in ((1, pair.chosen), (2, pair.rejected)):
      parts.append((ex.tokens[shared:], ex.loss_mask[shared:], branch, 2 * i + branch, shared))
    for tokens, mask, branch, response, first_position in parts:
      n = len(tokens)
      if start + n > length:
        raise ValueError(f"pairs of {sum(map(shared_pair_length, pairs))} tokens do not fit a row of {length}")
      end = start + n
      fields["tokens"][start:end] = tokens
      fields["targets"][start:end - 1] = tokens[1:]
      fields["loss_mask"][start:end - 1] = mask[1:]
      fields["positions"][start:end] = first_position + np.arange(n)
      fields["segment_ids"][start:end] = i + 1
      fields["branch_ids"][start:end] = branch
      fields["response_ids"][start:end] = response
      start = end
  return {**fields, **_slot_fields(len(pairs), max_pairs, "pair_mask",
                                    chosen_reward=[p.chosen_reward for p in pairs],
                                    rejected_reward=[p.rejected_reward for p in pairs])}


def feedback_row(items: list[KTOItem], length: int, pad_id: int, max_items: int) -> dict:
  """KTO samples laid out like pairs: sample p is segment 2p+1 and its KL sample 2p+2, with
  ``desirable`` (1.0 / 0.0) and ``pair_mask`` per slot."""
  return _slots_row([(it.example, it.kl_example) for it in items], length, pad_id, max_items,
                    desirable=[float(it.desirable) for it in items])


def plan_item_rows(items, length: int, *, pack: bool, size=len) -> list[list[int]]:
  """Rows of pairs or KTO items: one per row, or first-fit packed by ``size`` (default: their two
  sequences' length; ``shared_pair_length`` for shared-prompt rows)."""
  if not pack:
    return [[i] for i in range(len(items))]
  return first_fit([size(it) for it in items], length)


@dataclasses.dataclass(frozen=True)
class Group:
  """SteerLM 2.0: the responses sampled for one prompt and attribute label, with their importance
  weights (normalised over the group) and log Q'(y|a,x) under the model that sampled them."""
  responses: tuple[Example, ...]
  weights: np.ndarray       # [n] float
  q_prime: np.ndarray       # [n] float

  def __len__(self):
    return sum(len(r) for r in self.responses)


def _turns_as_messages(turns: list[dict]) -> list[dict]:
  roles = {v: k for k, v in _ROLES.items()}
  return [{"role": roles.get(t["from"], t["from"]), "content": t["value"]} for t in turns]


def encode_groups(records: list[dict], tok: Tokenizer, *, max_length: int, chat_format: NemoChatFormat,
                  over_length: str = "truncate") -> tuple[list[Group], EncodeStats]:
  """Tokenized ``steerlm2`` records: each response after the prompt rendered with the record's
  label (``chat_format``'s label tokens), its weight ``softmax(log P(a|x,y) + log P(y|x) - log Q'(y|a,x))``
  over the responses kept. A response that does not fit (or, with ``over_length="drop"``, whose
  prompt had to be cut) leaves the group; a group left with fewer than two responses is dropped."""
  stats = EncodeStats()
  groups = []
  for rec in records:
    prompt = ([{"role": "system", "content": rec["system"]}] if rec["system"] else []) + \
        _turns_as_messages(rec["prompt_turns"])
    kept, logs, cut_any = [], [], False
    for r in rec["responses"]:
      ex, cut = encode_response(prompt, r["value"], tok, max_length=max_length, chat_format=chat_format,
                                label=rec["label"])
      if ex is None or (over_length == "drop" and cut):
        continue
      cut_any |= cut
      kept.append(ex)
      logs.append([r["log(P(a|x,y))"], r["log(P(y|x))"], r["log(Q(y|a,x))"]])
    if len(kept) < 2:
      stats.dropped += 1
      continue
    logs = np.asarray(logs, np.float64)
    z = logs[:, 0] + logs[:, 1] - logs[:, 2]
    w = np.exp(z - z.max())
    stats.keep(*kept, truncated=cut_any)
    groups.append(Group(tuple(kept), (w / w.sum()).astype(np.float32), logs[:, 2].astype(np.float32)))
  return groups, stats


def group_row(groups: list[Group], length: int, pad_id: int, group_size: int) -> dict:
  """One group per row (or a padding row for ``[]``): response i is segment i+1, with ``sample_mask``,
  ``weights`` and ``q_prime`` ``[group_size]`` per row, 0 in unused slots."""
  if len(groups) > 1:
    raise ValueError(f"a SteerLM 2.0 row holds one group, got {len(groups)}")
  responses = list(groups[0].responses) if groups else []
  if len(responses) > group_size:
    raise ValueError(f"a group of {len(responses)} responses does not fit {group_size} slots")
  weights, q_prime = (groups[0].weights, groups[0].q_prime) if groups else ([], [])
  return {**build_row(responses, length, pad_id),
          **_slot_fields(len(responses), group_size, "sample_mask", weights=weights, q_prime=q_prime)}
