"""Knowledge-distillation data: SFT examples with the teacher's top-K logits per token (``jalign.distill``)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from jalign.data.packing import build_row
from jalign.data.sft import Example


def fingerprint(examples) -> str:
  """A digest of the examples' token ids: top-K made for other tokens is refused."""
  digest = hashlib.sha256()
  for ex in examples:
    digest.update(np.asarray(ex.tokens, np.int32).tobytes())
    digest.update(b"|")
  return digest.hexdigest()


def topk_path(topk_dir, data_file: Path) -> Path:
  """Where the teacher's top-K of ``data_file`` is stored."""
  return Path(topk_dir) / f"{Path(data_file).name}.topk.npz"


@dataclasses.dataclass(frozen=True)
class KDExample:
  example: Example
  teacher_ids: np.ndarray     # [len, K] int32: the teacher's top-K token ids at each position
  teacher_logits: np.ndarray  # [len, K] float32: their logits

  def __len__(self):
    return len(self.example)


def load_topk(path: Path, examples: list[Example], expected_fingerprint: str) -> list[KDExample]:
  """The examples with their stored top-K, checked to belong to exactly these examples."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no teacher top-K file; run python -m jalign.distill --config=<this config>")
  with np.load(path) as f:
    ids, logits, offsets, stored = f["ids"], f["logits"], f["offsets"], str(f["fingerprint"])
  if stored != expected_fingerprint or len(offsets) != len(examples) + 1:
    raise ValueError(f"{path}: made for other token ids (data, tokenizer or max_seq_length changed); "
                     "run python -m jalign.distill again")
  return [KDExample(ex, ids[a:b], logits[a:b]) for ex, a, b in zip(examples, offsets[:-1], offsets[1:])]


def kd_row(items: list[KDExample], length: int, pad_id: int, *, top_k: int) -> dict:
  """A packed SFT row (``packing.build_row``) plus ``teacher_ids`` / ``teacher_logits`` ``[length, K]``
  aligned with ``targets``: the teacher's top-K at the position that predicts each target."""
  row = build_row([it.example for it in items], length, pad_id)
  ids = np.zeros((length, top_k), np.int32)
  logits = np.zeros((length, top_k), np.float32)
  start = 0
  for it in items:
    n = len(it)
    ids[start:start + n] = it.teacher_ids
    logits[start:start + n] = it.teacher_logits
    start += n
  return {**row, "teacher_ids": ids, "teacher_logits": logits}
