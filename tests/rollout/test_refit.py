"""The refit's pieces in one process: buckets, the manifest's checks, and a copy pulled bucket by bucket
through two transfer servers into arrays laid out as the receiver's (the served engine's two processes:
tests/serve/test_served_engine.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.rollout import refit


def test_buckets_hold_consecutive_weights_up_to_the_size_and_a_larger_weight_alone():
  assert refit.plan_buckets([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
  assert refit.plan_buckets([3], 1) == [[0]]


def _weights(mesh, axis):
  """Two weights sharded over ``axis`` of ``mesh`` (rows) and one replicated, as pytree of arrays."""
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  return {"a": put(jnp.arange(64.0).reshape(8, 8), PartitionSpec(axis, None)),
          "b": put(jnp.ones((8, 4), jnp.bfloat16), PartitionSpec(axis, None)),
          "c": put(jnp.full((3,), 2, jnp.int32), PartitionSpec())}


def test_a_copy_moves_bucket_by_bucket_into_the_receivers_arrays():
  devices = np.asarray(jax.devices()[:4])
  sender = _weights(Mesh(devices, ("tensor",)), "tensor")
  receiver_tree = jax.tree.map(jnp.zeros_like, _weights(Mesh(devices, ("model",)), "model"))  # its own axis name
  flat, treedef = jax.tree_util.tree_flatten_with_path(receiver_tree)
  weights = [x for _, x in flat]
  offer = refit.Offer("127.0.0.1:1")
  manifest = offer.offer(sender, version=7, bucket_bytes=256)  # a: 256 bytes; b and c together
  assert [b["leaves"] for b in manifest["buckets"]] == [[0], [1, 2]]
  refit.check(manifest, refit.describe(flat), refit.mesh_shape(weights))
  receiver = refit.start_server("127.0.0.1")
  done = refit.pull_weights(weights, manifest, timeout_s=60, connect=receiver.connect)
  assert (done.version, done.buckets, done.bytes) == (7, 2, 256 + 64 + 12)
  for got, want, old in zip(weights, jax.tree.leaves(sender), [x for _, x in flat]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == old.sharding  # laid out as the receiver's own


def test_a_manifest_that_does_not_fit_is_refused_before_anything_moves():
  devices = np.asarray(jax.devices()[:4])
  mine = jax.tree_util.tree_flatten_with_path(_weights(Mesh(devices, ("tensor",)), "tensor"))[0]
  ours = refit.describe(mine)
  other = jax.tree_util.tree_flatten_with_path(_weights(Mesh(devices[:2], ("tensor",)), "tensor"))[0]
  manifest = {"version": 1, "address": "", "weights": refit.describe(other), "mesh": {"tensor": 2}, "buckets": []}
  with pytest.raises(refit.RefitError, match=r"the actor lays out a as \['tensor', None\] over mesh \{'tensor': 2\}, "
                                             r"this server as \['tensor', None\] over \{'tensor': 4\}"):
    refit.check(manifest, ours, {"tensor": 4})
  wrong = [dict(w) for w in ours]
  wrong[1]["dtype"] = "float32"
  with pytest.raises(refit.RefitError, match=r"the actor's b is float32\[8, 4\], this server's b is bfloat16\[8, 4\]"):
    refit.check({**manifest, "weights": wrong}, ours, {"tensor": 4})
