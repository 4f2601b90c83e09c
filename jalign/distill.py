"""Knowledge distillation's offline step: the teacher's top-K logits for every token of a KD config's data.

  python -m jalign.distill --config=configs/kd_tiny.py

Reads ``config.kd.teacher`` (a model init: ``run:<folder>``, ``hf:<folder>``, ``gguf:<file>`` or
``smollm2``), encodes ``data.train`` and ``data.validation`` exactly as training will (same tokenizer,
template and truncation: teacher and student must share the tokenizer) and writes, for each file,
``<kd.topk_dir>/<file name>.topk.npz`` with ``ids`` and ``logits`` ``[tokens, K]`` (the teacher's top-K
at each position, position j predicting token j+1), ``offsets [examples + 1]`` and a ``fingerprint`` of
the token ids. Training checks the fingerprint, so a changed data file, tokenizer or length is an error
naming the file instead of silently misaligned targets.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from jalign import config as config_lib


def fingerprint(examples) -> str:
  digest = hashlib.sha256()
  for ex in examples:
    digest.update(np.asarray(ex.tokens, np.int32).tobytes())
    digest.update(b"|")
  return digest.hexdigest()


def topk_path(c, spec: str) -> Path:
  return Path(c.kd.topk_dir) / f"{config_lib.data_path(spec).name}.topk.npz"


def teacher_topk(model, examples, *, k: int, batch_rows: int = 8, pad_id: int = 0):
  """``(ids, logits, offsets)`` of the teacher's top-``k`` logits at every position of ``examples``."""
  graphdef, state = nnx.split(model)
  length = max(len(ex) for ex in examples)

  @jax.jit
  def top(state, tokens):
    teacher = nnx.merge(graphdef, state, copy=True)
    values, ids = jax.lax.top_k(teacher(tokens), k)
    return ids, values

  ids_out, logits_out = [], []
  for start in range(0, len(examples), batch_rows):
    chunk = examples[start:start + batch_rows]
    tokens = np.full((batch_rows, length), pad_id, np.int32)
    for i, ex in enumerate(chunk):
      tokens[i, :len(ex)] = ex.tokens
    ids, values = jax.device_get(top(state, jnp.asarray(tokens)))
    for i, ex in enumerate(chunk):
      ids_out.append(ids[i, :len(ex)])
      logits_out.append(values[i, :len(ex)].astype(np.float32))
  offsets = np.cumsum([0] + [len(ex) for ex in examples])
  return np.concatenate(ids_out), np.concatenate(logits_out), offsets


def run(c, log=print) -> list[Path]:
  from jalign import train
  config_lib.validate(c, check_files=True)
  teacher_config = c.copy_and_resolve_references()
  teacher_config.model.init = c.kd.teacher
  teacher, own_tokenizer = train.build_model(teacher_config)
  tok = train.build_tokenizer(c, own_tokenizer)
  written = []
  for spec in [c.data.train] + ([c.data.validation] if c.data.validation else []):
    examples, _ = train.load_examples(c, tok, spec, log)
    ids, logits, offsets = teacher_topk(teacher, examples, k=c.kd.top_k, pad_id=tok.pad_id or 0)
    path = topk_path(c, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=ids, logits=logits, offsets=offsets, fingerprint=np.array(fingerprint(examples)))
    tmp.replace(path)
    log(f"{path}: top-{c.kd.top_k} of {len(examples)} examples, {len(ids)} tokens")
    written.append(path)
  return written


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError("--config=configs/<name>.py (a kd config) is required")
  try:
    run(config_flag.value)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  config_flag = config_flags.DEFINE_config_file("config", None, "a KD config file", lock_config=True)
  app.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
