"""Rows of a batch: one example per row (padded), or several packed first-fit into one row.

A row is a dict of ``[T]`` arrays:
  ``tokens``       inputs, ``pad_id`` past the content;
  ``targets``      ``tokens`` shifted left by one (the token each position predicts);
  ``loss_mask``    1.0 where the target is covered by the loss; never across a document boundary;
  ``positions``    restart at 0 for each packed document;
  ``segment_ids``  1, 2, ... per document, 0 for padding: attention stays within a document.
"""

from __future__ import annotations

import numpy as np

from jalign.data.sft import Example


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
  """Indices grouped into bins of total length <= capacity, each item in the first bin it fits."""
  bins: list[list[int]] = []
  space: list[int] = []
  for i, n in enumerate(lengths):
    if n > capacity:
      raise ValueError(f"example {i} has {n} tokens, more than the row length {capacity}")
    for b, free in enumerate(space):
      if n <= free:
        bins[b].append(i)
        space[b] -= n
        break
    else:
      bins.append([i])
      space.append(capacity - n)
  return bins


def build_row(examples: list[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
  tokens = np.full(length, pad_id, np.int32)
  targets = np.full(length, pad_id, np.int32)
  loss_mask = np.zeros(length, np.float32)
  positions = np.zeros(length, np.int32)
  segment_ids = np.zeros(length, np.int32)
  start = 0
  for seg, ex in enumerate(examples, 1):
    n = len(ex)
    if start + n > length:
      raise ValueError(f"examples of {sum(map(len, examples))} tokens do not fit a row of {length}")
    end = start + n
    tokens[start:end] = ex.tokens
    targets[start:end - 1] = ex.tokens[1:]
    loss_mask[start:end - 1] = ex.loss_mask[1:]
    positions[start:end] = np.arange(n)
    segment_ids[start:end] = seg
    start = end
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "positions": positions,
          "segment_ids": segment_ids}


def plan_rows(examples: list[Example], length: int, *, pack: bool, order=None) -> list[list[int]]:
  """Which examples go in each row; ``order`` (a permutation) is the order packing sees them in."""
  order = list(range(len(examples))) if order is None else list(order)
  if not pack:
    return [[i] for i in order]
  bins = first_fit([len(examples[i]) for i in order], length)
  return [[order[j] for j in b] for b in bins]
