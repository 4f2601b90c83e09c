"""Grain pipelines: rows -> shuffled global batches -> this process's slice, as numpy dicts.

The order of rows is shuffled once per epoch with the seed and cut into global batches; process p
of P builds only rows ``[p*B/P, (p+1)*B/P)`` of each global batch. So the global batches (and the
losses) are the same whatever the number of processes, and each process tokenizes nothing twice
and builds only its share. ``BatchIterator.get_state()`` is a small JSON-able dict; ``set_state``
resumes with exactly the next batch.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from jalign.data.packing import build_row


# Batches are built a few steps ahead by one thread: a step takes far longer than building its batch.
# (Grain's default, 16 threads filling a buffer of 500 batches, holds hundreds of global batches in host
# memory and keeps the host's cores busy with batches no step may reach.)
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class BatchIterator:
  """An endless (or ``num_epochs``-long) iterator of batches ``{name: [B, T]}``."""

  def __init__(self, dataset: grain.MapDataset):
    self._dataset = dataset
    self._it = iter(dataset.to_iter_dataset(READ_OPTIONS))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


def trim_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Cut the padding columns past the longest row, keeping a multiple of ``multiple`` columns.

  Only the per-token ``[rows, length]`` fields are cut; per-row fields (``[rows, ...]`` of another
  width, such as the pair slots of preference rows) are left as they are.
  """
  length = batch["tokens"].shape[1]
  used = int(np.max(np.nonzero(batch["segment_ids"].any(axis=0))[0], initial=0)) + 1
  width = min(length, -(-used // multiple) * multiple)
  return {k: v[:, :width] if v.ndim == 2 and v.shape[1] == length and k in _TOKEN_FIELDS else v
          for k, v in batch.items()}


_TOKEN_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "branch_ids", "response_ids",
                 "teacher_ids", "teacher_logits")


def row_dataset(rows: list[list[int]], examples, *, length: int, pad_id: int, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, pad_to_multiple_of: int = 0,
                make_row=build_row, pad_last_batch: bool = False) -> grain.MapDataset:
  """This process's slices of global batches of ``batch_size`` rows.

  With ``pad_last_batch`` (evaluation), the last partial batch is filled with empty rows, which
  carry no loss weight, instead of being dropped.

  A row is ``make_row([items...], length, pad_id)`` of the items its entry of ``rows`` indexes
  (several for packed SFT rows; one pair, feedback, prompt or regression text otherwise).

  Rows are ``length`` long; with ``pad_to_multiple_of`` each batch is cut to its longest row rounded
  up to that multiple (less padding, one compilation per distinct width).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"a global batch of {batch_size} rows does not split over {process_count} processes")
  if len(rows) < batch_size and not pad_last_batch:
    raise ValueError(f"{len(rows)} rows, fewer than one batch of {batch_size}")
  share = batch_size // process_count
  ds = grain.MapDataset.range(len(rows))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=not pad_last_batch)

  def local_rows(indices):
    indices = np.pad(indices, (0, batch_size - len(indices)), constant_values=-1)
    mine = indices[process_index * share:(process_index + 1) * share]
    built = [make_row([examples[i] for i in rows[int(r)]] if r >= 0 else [], length, pad_id) for r in mine]
    return jax.tree.map(lambda *xs: np.stack(xs), *built)

  ds = ds.map(local_rows)
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
