"""Knowledge distillation's offline step: the teacher's top-K logits for every token of a KD config's data.

Reads ``config.kd.teacher`` (a model init: ``run:<folder>``, ``hf:<folder>``, ``gguf:<file>`` or
``smollm2``), encodes ``data.train`` and ``data.validation`` exactly as training will (same tokenizer,
template and truncation: teacher and student must share the tokenizer) and writes, for each file,
``<kd.topk_dir>/<file name>.topk.npz`` with ``ids`` and ``logits`` ``[tokens, K]`` (the teacher's top-K
at each position, position j predicting token j+1), ``offsets [examples + 1]`` and a ``fingerprint`` of
the token ids. Training checks the fingerprint, so a changed data file, tokenizer or length is an error
naming the file instead of silently misaligned targets.

The teacher is read straight onto the config's mesh (``config.mesh``, sharded by its rules, as the
student will train) with its weights in the compute dtype: frozen, it needs no float32 master copy.
Each pass splits its rows over the mesh's data-parallel groups; with several processes
(``config.distributed``) every process computes the same top-K and process 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign import config as config_lib
from jalign.data import distillation
from jalign.parallel import mesh as pmesh
from jalign.recipes import build
from jalign.specs import encoders


def teacher_topk(model, examples, *, k: int, batch_rows: int = 8, pad_id: int = 0, mesh=None,
                 rules=pmesh.DEFAULT_RULES):
  """``(ids, logits, offsets)`` of the teacher's top-``k`` logits at every position of ``examples``;
  with the ``mesh`` the model is placed on, each pass's rows are split over its data-parallel groups
  (``batch_rows`` rounded up to a multiple of them)."""
  graphdef, state = nnx.split(model)
  length = max(len(ex) for ex in examples)
  if mesh is not None:
    groups = pmesh.data_parallel_size(mesh, rules)
    batch_rows = -(-batch_rows // groups) * groups

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
    tokens = jnp.asarray(tokens) if mesh is None else pmesh.put_global_batch(tokens, mesh, rules)
    with pmesh.use(mesh, rules):
      ids, values = (pmesh.fetch(x) for x in top(state, tokens))
    for i, ex in enumerate(chunk):
      ids_out.append(ids[i, :len(ex)])
      logits_out.append(values[i, :len(ex)].astype(np.float32))
  offsets = np.cumsum([0] + [len(ex) for ex in examples])
  return np.concatenate(ids_out), np.concatenate(logits_out), offsets


def teacher_config(c):
  """The config whose ``model`` is ``kd.teacher``: the student's, with the weights in the compute dtype."""
  t = c.copy_and_resolve_references()
  t.model.init = c.kd.teacher
  t.model.param_dtype = c.model.dtype
  return t


def run(c, log=print) -> list[Path]:
  config_lib.validate(c, check_files=True, process_count=jax.process_count(), device_count=jax.device_count())
  mesh, rules = pmesh.make_mesh(dict(c.mesh)), build.rules_of(c)
  teacher, own_tokenizer = build.build_model(teacher_config(c), mesh, rules)
  tok = build.build_tokenizer(c, own_tokenizer)
  written = []
  for spec in [c.data.train] + ([c.data.validation] if c.data.validation else []):
    examples, _ = build.load_examples(c, tok, spec, log, encode=encoders.sft_records)
    ids, logits, offsets = teacher_topk(teacher, examples, k=c.kd.top_k, pad_id=tok.pad_id or 0, mesh=mesh,
                                        rules=rules)
    path = distillation.topk_path(c.kd.topk_dir, config_lib.data_path(spec))
    written.append(path)
    if jax.process_index() != 0:
      continue
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=ids, logits=logits, offsets=offsets, fingerprint=np.array(distillation.fingerprint(examples)))
    tmp.replace(path)
    log(f"{path}: top-{c.kd.top_k} of {len(examples)} examples, {len(ids)} tokens")
  return written
