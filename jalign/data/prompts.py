"""Prompt-only data (PPO, REINFORCE rollouts) and regression reward-model data, tokenized.

Prompts longer than ``max_length`` keep their last ``max_length`` tokens (the end of a prompt is what
the response follows); regression texts that do not fit are dropped, as NeMo-Aligner does. Both are
counted.
"""

from __future__ import annotations

import numpy as np

from jalign.data.packing import build_row
from jalign.data.sft import EncodeStats, Example
from jalign.data.tokenizer import Tokenizer


def encode_prompts(records: list[dict], tok: Tokenizer, *, max_length: int,
                   add_bos: bool = False) -> tuple[list[np.ndarray], EncodeStats]:
  stats = EncodeStats()
  out = []
  for rec in records:
    ids = tok.encode(rec["text"], add_special_tokens=False)
    if add_bos and tok.bos_id is not None:
      ids = [tok.bos_id] + ids
    if len(ids) > max_length:
      ids = ids[len(ids) - max_length:]
      stats.truncated += 1
    stats.examples += 1
    stats.tokens += len(ids)
    out.append(np.asarray(ids, np.int32))
  return out, stats


def encode_regression(records: list[dict], tok: Tokenizer, *, max_length: int,
                      num_attributes: int | None = None) -> tuple[list[tuple[Example, np.ndarray]], EncodeStats]:
  """``(Example, label [A])`` pairs; every label must have ``num_attributes`` entries when given."""
  stats = EncodeStats()
  out = []
  for i, rec in enumerate(records):
    label = np.asarray(rec["label"], np.float32)
    if num_attributes is not None and label.shape != (num_attributes,):
      raise ValueError(f"record {i}: label has {label.shape[0]} attributes, expected {num_attributes}")
    ids = tok.encode(rec["text"], add_special_tokens=False)
    if len(ids) > max_length:
      stats.dropped += 1
      continue
    stats.examples += 1
    stats.tokens += len(ids)
    tokens = np.asarray(ids, np.int32)
    out.append((Example(tokens, np.zeros(len(tokens), bool)), label))
  return out, stats


def prompt_row(prompt: np.ndarray, length: int, pad_id: int) -> dict:
  tokens = np.full(length, pad_id, np.int32)
  tokens[:len(prompt)] = prompt
  return {"tokens": tokens, "length": np.int32(len(prompt))}


def regression_row(item: tuple[Example, np.ndarray], length: int, pad_id: int) -> dict:
  example, label = item
  return {**build_row([example], length, pad_id), "length": np.int32(len(example)), "label": label}


def regression_rows(items: list[tuple[Example, np.ndarray]], length: int, pad_id: int, *, num_attributes: int,
                    mask_value: float = -100.0) -> dict:
  """``make_row`` for regression data: one text per row, or an empty padding row whose labels are all
  ``mask_value`` (so it carries no loss)."""
  if len(items) > 1:
    raise ValueError(f"regression rows hold one text, got {len(items)}")
  if items:
    return regression_row(items[0], length, pad_id)
  return {**build_row([], length, pad_id), "length": np.int32(0),
          "label": np.full(num_attributes, mask_value, np.float32)}
