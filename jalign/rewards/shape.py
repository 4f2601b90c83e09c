"""Rewards for a response's shape rather than its correctness: reasoning and answer tags, and length."""

from __future__ import annotations

import re


def tagged(text: str, tags: tuple[str, ...] = ("think", "answer")) -> bool:
  """Whether ``text`` is exactly one ``<tag>...</tag>`` block per tag, in order, with only whitespace
  around and between them."""
  body = r"\s*".join(rf"<{t}>(?:(?!<{t}>|</{t}>).)*?</{t}>" for t in tags)
  return re.fullmatch(rf"\s*{body}\s*", text, re.DOTALL) is not None


def think_answer(prompt: str, response: str, record: dict) -> float:
  """Reward function: 1.0 for ``<think>...</think><answer>...</answer>`` and nothing else, else 0.0."""
  del prompt, record
  return 1.0 if tagged(response) else 0.0


def concise(prompt: str, response: str, record: dict) -> float:
  """Reward function: 0 up to the record's ``length_budget`` characters (default 512), then falling by
  1 per budget's worth of characters beyond it."""
  del prompt
  budget = float(record.get("length_budget", 512))
  return -max(0.0, len(response) - budget) / budget
