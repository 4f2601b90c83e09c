"""A train step on a mesh of 8 CPU devices equals the single-device step, for every mesh layout."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jalign import trainer
from jalign.losses import sft
from jalign.models import LlamaConfig, Transformer
from jalign.parallel import mesh as pmesh

# Wide enough that every axis divides something: 8 heads, 4 KV heads (replicated on tensor=8).
CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=8,
                     num_kv_heads=4)
LR = 1e4
MESHES = [{"data": 8}, {"fsdp": 8}, {"tensor": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
          {"data": 2, "pipeline": 2, "tensor": 2}, {"pipeline": 4, "data": 2}]


def _batch(rows=16, length=16):
  r = np.random.RandomState(0)
  tokens = r.randint(3, 512, (rows, length)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": (r.rand(rows, length) > 0.3).astype(np.float32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          "segment_ids": np.ones((rows, length), np.int32)}


def _step(mesh=None, micro_batches=2, pipeline_microbatches=None, repeats=1):
  stages = 1 if mesh is None else mesh.shape["pipeline"]
  cfg = CONFIG.replace(pipeline_stages=stages, pipeline_microbatches=pipeline_microbatches or stages,
                       pipeline_repeats=repeats)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tx = optax.sgd(LR)  # new params = params - LR * grads: LR large so the parameters' rounding is negligible
  graphdef, state = trainer.init_state(model, tx)
  step = trainer.make_train_step(graphdef, sft.loss, tx, micro_batches=micro_batches)
  batch = _batch()
  if mesh is None:
    new, metrics = jax.jit(step)(state, batch)
    return state, new, metrics
  with pmesh.use(mesh):
    shardings = pmesh.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    batch_shardings = pmesh.batch_shardings(batch, mesh)
    batch = pmesh.put_batch(batch, mesh)
    new, metrics = jax.jit(step, in_shardings=(shardings, batch_shardings),
                           out_shardings=(shardings, None))(state, batch)
  return state, new, metrics


@pytest.fixture(scope="module")
def reference():
  return _step()


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_step_equals_single_device(reference, sizes):
  _assert_same_step(reference, _step(pmesh.make_mesh(sizes)))


@pytest.mark.parametrize("pipeline_microbatches", [1, 2, 4])
def test_circular_pipeline_step_equals_single_device(reference, pipeline_microbatches):
  """Two stages holding two non-adjacent layer groups each (4 layers), micro-batches fewer than,
  equal to and twice the stages."""
  mesh = pmesh.make_mesh({"pipeline": 2, "data": 4})
  _assert_same_step(reference, _step(mesh, pipeline_microbatches=pipeline_microbatches, repeats=2))


def _assert_same_step(reference, result):
  old_ref, new_ref, metrics_ref = reference
  old, new, metrics = result
  assert abs(float(metrics["loss"]) / float(metrics_ref["loss"]) - 1) < 1e-5
  for (path, a), (_, b), (_, a0) in zip(nnx.to_flat_state(new.params), nnx.to_flat_state(new_ref.params),
                                        nnx.to_flat_state(old_ref.params)):
    p0 = np.asarray(a0.get_value(), np.float64)
    grad, grad_ref = (p0 - np.asarray(a.get_value())) / LR, (p0 - np.asarray(b.get_value())) / LR
    scale = np.abs(grad_ref).max()
    assert np.abs(grad - grad_ref).max() <= 1e-5 * scale + 1e-8, path


def test_parameters_are_sharded_as_the_rules_say():
  mesh = pmesh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  old, new, _ = _step(mesh)
  P = jax.sharding.PartitionSpec
  specs = {path: v.get_value().sharding.spec for path, v in nnx.to_flat_state(new.params)}
  assert specs[("layers", "attn", "q_proj")] == P("pipeline", "fsdp", "tensor", None)  # column parallel
  assert specs[("layers", "attn", "o_proj")] == P("pipeline", "tensor", None, "fsdp")  # row parallel
  assert specs[("layers", "mlp", "down_proj")] == P("pipeline", "tensor", "fsdp")
  assert specs[("embed",)] == P("tensor", "fsdp") and specs[("lm_head",)] == P("fsdp", "tensor")  # vocab parallel


def test_mesh_shape_fill_and_errors():
  assert pmesh.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "pipeline": 1, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices"):
    pmesh.mesh_shape({"data": 3, "tensor": 2}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    pmesh.mesh_shape({"model": 8}, 8)


def test_a_small_model_made_by_one_program_has_the_per_variable_programs_values(monkeypatch):
  cfg = LlamaConfig.preset("tiny")
  mesh = pmesh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(3))  # noqa: E731
  one = nnx.to_flat_state(nnx.state(pmesh.create_sharded(make, mesh)))
  monkeypatch.setattr(pmesh, "ONE_PROGRAM_BYTES", 0)
  each = nnx.to_flat_state(nnx.state(pmesh.create_sharded(make, mesh)))
  assert [path for path, _ in one] == [path for path, _ in each]
  for (path, a), (_, b) in zip(one, each):
    a, b = a.get_value(), b.get_value()
    assert a.sharding == b.sharding, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
