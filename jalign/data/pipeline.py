"""Grain pipelines: rows -> shuffled, per-process, batched numpy dicts with a checkpointable position.

Each process of a multi-host job reads only its share of the rows (``rows[process::processes]``)
and produces its slice of the global batch. ``BatchIterator.get_state()`` is a small JSON-able dict;
``set_state`` resumes with exactly the next batch.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from jalign.data.packing import build_row


class BatchIterator:
  """An endless (or ``num_epochs``-long) iterator of batches ``{name: [B, T]}``."""

  def __init__(self, dataset: grain.MapDataset):
    self._dataset = dataset
    self._it = iter(dataset.to_iter_dataset())

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


def trim_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Cut the padding columns past the longest row, keeping a multiple of ``multiple`` columns."""
  used = int(np.max(np.nonzero(batch["segment_ids"].any(axis=0))[0], initial=0)) + 1
  width = min(batch["tokens"].shape[1], -(-used // multiple) * multiple)
  return {k: v[:, :width] for k, v in batch.items()}


def row_dataset(rows: list[list[int]], examples, *, length: int, pad_id: int, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, pad_to_multiple_of: int = 0,
                make_row=build_row) -> grain.MapDataset:
  """Batches of ``batch_size`` rows for this process; ``batch_size`` is the per-process batch.

  A row is ``make_row([items...], length, pad_id)`` of the items its entry of ``rows`` indexes
  (several for packed SFT rows; one pair, feedback, prompt or regression text otherwise).

  Rows are ``length`` long; with ``pad_to_multiple_of`` each batch is cut to its longest row rounded
  up to that multiple (less padding, one compilation per distinct width).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(rows)[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"{len(ds)} rows for this process, fewer than its batch of {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(lambda row: make_row([examples[i] for i in row], length, pad_id))
  ds = ds.batch(batch_size, drop_remainder=True)
  if pad_to_multiple_of:
    ds = ds.map(lambda batch: trim_batch(batch, pad_to_multiple_of))
  return ds


def batches(rows, examples, **kwargs) -> BatchIterator:
  return BatchIterator(row_dataset(rows, examples, **kwargs))


def single(make_item_row):
  """A ``make_row`` for rows of one item (pairs, feedback, prompts, regression texts)."""
  def make_row(items, length, pad_id):
    if len(items) != 1:
      raise ValueError(f"this data has one item per row, got {len(items)}")
    return make_item_row(items[0], length, pad_id)
  return make_row
