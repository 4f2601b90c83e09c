"""The device mesh, the logical-axis rules table, and shardings for states and batches.

One mesh with axes ``(data, pipeline, fsdp, tensor)``, outermost first: with several hosts the outer
axes span hosts and ``tensor`` stays inside a host. Axes are ``Auto`` (GSPMD): the model pins
activations with ``with_sharding_constraint`` and XLA inserts the collectives.

One rules table maps the model's logical names to mesh axes (Megatron-style tensor parallelism,
ZeRO-3-style FSDP):
  column-parallel q/k/v/gate/up: their ``heads``/``kv_heads``/``mlp`` output dims over ``tensor``;
  row-parallel o/down: the same names, now their input dims; vocab-parallel embedding and LM head;
  every parameter's ``embed`` dim over ``fsdp`` (parameters, gradients and Adam moments alike);
  the batch over ``data`` and ``fsdp``.
A dimension a mesh axis does not divide is replicated instead (``fit_spec``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jalign.parallel.logical import logical_to_spec, variable_spec

AXES = ("data", "pipeline", "fsdp", "tensor")
DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", "pipeline"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
  """Axis sizes with at most one -1 filled so that the product is ``device_count``."""
  unknown = [a for a in sizes if a not in AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the axes are {AXES}")
  shape = {a: int(sizes.get(a, 1)) for a in AXES}
  fill = [a for a, n in shape.items() if n == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill}")
  known = math.prod(n for n in shape.values() if n != -1)
  if fill:
    if device_count % known:
      raise ValueError(f"{device_count} devices do not split into {shape}")
    shape[fill[0]] = device_count // known
  if math.prod(shape.values()) != device_count:
    raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, there are {device_count}")
  return shape


def make_mesh(sizes: Mapping[str, int] | None = None, *, devices=None) -> Mesh:
  """A mesh over ``devices`` (default: all), axes in ``AXES`` order, all ``Auto``.

  With several processes, devices are ordered process by process, so the outer axes span hosts and
  the inner ones (``tensor`` first) stay within a host.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes or {"data": -1}, len(devices))
  devices.sort(key=lambda d: (d.process_index, d.id))
  grid = np.asarray(devices, dtype=object).reshape([shape[a] for a in AXES])
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


@contextlib.contextmanager
def use(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Trace and run under ``mesh`` with ``rules`` (so that activation constraints apply)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    yield


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree: Variables by their logical axes, anything else replicated."""

  def one(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, variable_spec(x, rules, mesh)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# A model of at most this many bytes (the tiny presets) is made by one program: per-variable programs
# bound the peak memory where it matters, and for a model of a few MB they are only a compile each.
ONE_PROGRAM_BYTES = 16 * 2**20


def create_sharded(make, mesh: Mesh | None, rules=DEFAULT_RULES):
  """The NNX module ``make()`` builds, each variable created straight into its sharding by ``rules``, so
  that no device or host ever holds a whole parameter the mesh splits. Shapes come from
  ``nnx.eval_shape``; each variable's value from a jitted ``make`` that returns only it, laid out by its
  sharding. They run in decreasing order of their scratch memory (a random draw's bits), so that the
  largest scratch is needed while few values are held. A model of at most ``ONE_PROGRAM_BYTES`` is made
  by one jitted ``make`` (the same values). Without a mesh, ``make()``."""
  if mesh is None:
    return make()
  with use(mesh, rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shapes, treedef = jax.tree.flatten(abstract)
    shardings = jax.tree.leaves(tree_shardings(abstract, mesh, rules))
    if sum(x.size * x.dtype.itemsize for x in shapes) <= ONE_PROGRAM_BYTES:
      values = jax.jit(lambda: jax.tree.leaves(nnx.split(make())[1]), out_shardings=shardings)()
      return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
    programs = [jax.jit(lambda i=i: jax.tree.leaves(nnx.split(make())[1])[i], out_shardings=sharding).lower()
                .compile() for i, sharding in enumerate(shardings)]
    values = [None] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -_scratch_bytes(programs[i])):
      values[i] = programs[i]()
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def _scratch_bytes(compiled) -> int:
  memory = compiled.memory_analysis()
  return 0 if memory is None else int(memory.temp_size_in_bytes)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Rows over the mesh axes the ``batch`` rule names (the sharding of ``[B]`` per-row arrays)."""
  return NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules)[0]))


def batch_shardings(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """For every array of a batch: rows over the mesh axes the ``batch`` rule names, the rest whole."""
  rows = logical_to_spec(("batch",), rules)[0]
  return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(rows, *([None] * (np.ndim(x) - 1)))), batch)


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the rows of a batch are split."""
  rows = logical_to_spec(("batch",), rules)[0]
  axes = () if rows is None else (rows if isinstance(rows, tuple) else (rows,))
  return math.prod(mesh.shape[a] for a in axes)


def inference_rules(rules):
  """The rules of a generation copy of the weights: sharded over ``tensor`` only (replicated over the
  data-parallel axes, as NeMo reshards for TensorRT-LLM), so a decode step gathers nothing."""
  out = []
  for logical, axes in rules:
    if logical.startswith("act_") or logical in ("batch", "length", "cache_length"):
      out.append((logical, axes))
      continue
    kept = tuple(a for a in (axes if isinstance(axes, (tuple, list)) else (axes,)) if a == "tensor")
    out.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(out)


def put_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Global arrays from each process's share of the batch (rows in process order)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      batch, batch_shardings(batch, mesh, rules))


def from_host(x, sharding) -> jax.Array:
  """A global array of the host value ``x``, which every process holds alike: each process places the
  parts its own devices hold."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place(tree, shardings):
  """``jax.device_put(tree, shardings)`` that also works across processes: arrays already spread over
  processes are resharded by a compiled copy, host or single-device values placed from each process's
  own (equal) copy; a shardings prefix tree (one per ``nnx.Variable``) is allowed."""
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:  # already there: no copy
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda v: v, out_shardings=sharding)(x)
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    return from_host(x, sharding)
  return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: one(x, sharding), sub), shardings, tree)


def put_global_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Global arrays from a whole batch that every process holds alike (rollouts, which each process
  computes in full): each process places the rows of its own devices."""
  return jax.tree.map(from_host, batch, batch_shardings(batch, mesh, rules))


def process_rows(batch):
  """This process's share of a whole batch (equal consecutive slices in process order), as ``put_batch``
  expects it."""
  n = jax.process_count()
  if n == 1:
    return batch
  i = jax.process_index()
  return jax.tree.map(lambda x: x[i * (len(x) // n):(i + 1) * (len(x) // n)], batch)


def fetch(x) -> np.ndarray:
  """The whole value of an array on this host, also when its shards live on other processes' devices."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
