"""Logical axis names for parameters and activations, and the helper that pins activations to them.

Every model array carries a tuple of logical names (``"batch"``, ``"embed"``, ``"heads"``...). A rules
table, set with ``flax.nnx.logical_axis_rules(rules)``, maps each name to mesh axes. Without an active
mesh (``jax.set_mesh``) and rules, the helpers here do nothing, so the same model code runs in a
notebook on one CPU and sharded over hundreds of GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"
VALUE_OUT = "value_out"
# Activation axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
CACHE_LENGTH = "cache_length"

LogicalNames = Sequence[str | None]


def active_mesh():
  """The mesh set with ``jax.set_mesh``, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def logical_to_spec(names: LogicalNames, rules=None) -> PartitionSpec:
  """Map logical names to a PartitionSpec; names without a rule stay unsharded."""
  if rules is None:
    rules = flax_spmd.get_logical_axis_rules()
  table: dict[str, object] = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)  # first rule wins, as in Flax
  return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Pin an activation to its logical sharding; identity without a mesh and rules."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = active_mesh()
  if mesh is None or not rules:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match an array of shape {x.shape}")
  # Fitted like the parameters: a dimension an axis does not divide (2 KV heads, tensor 8) stays whole.
  return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(names, rules), x.shape, mesh))


def variable_spec(variable, rules=None, mesh=None) -> PartitionSpec:
  """The PartitionSpec of an NNX Variable from its ``logical_axes``; with ``mesh``, fitted to it."""
  names = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
  spec = logical_to_spec(names, rules)
  return spec if mesh is None else fit_spec(spec, variable.shape, mesh)


def param_specs(state, rules=None):
  """PartitionSpecs for every Variable of an NNX state (or module), from its logical names."""
  from flax import nnx

  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  return jax.tree.map(lambda v: variable_spec(v, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def fit_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
  """Drop mesh axes from dimensions they do not divide (e.g. 8 KV heads on 16-way tensor parallel).

  Such dimensions are replicated instead, which is what a user with more devices than heads wants.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    group = axes if isinstance(axes, tuple) else (axes,)
    size = 1
    for a in group:
      size *= mesh.shape[a]
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)
