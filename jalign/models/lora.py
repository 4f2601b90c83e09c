"""LoRA adapters for the Llama-family decoder (``jalign.models.llama``), with NeMo's defaults.

``add_lora`` gives each targeted projection kernel ``W [*in, *out]`` of every layer two extra
parameters, ``A [*in, r]`` (random) and ``B [r, *out]`` (zeros), stacked on the layer axis like
``W`` itself, so they go through ``nnx.scan`` and the pipelined path unchanged. The projection then
computes ``x W + (alpha / r) (x A) B`` (see ``llama._with_lora``): the low-rank term is applied to
the activations, never as a merged ``[*in, *out]`` matrix, so training costs two skinny matmuls per
projection and keeps no weight-sized temporaries for the backward pass.

Training only the adapters::

    add_lora(model, rank=32, rngs=nnx.Rngs(0))
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)     # optimise `lora` only
    loss = lambda lora: loss_fn(nnx.merge(graphdef, lora, base))

Reference pass with the adapters off (DPO/KTO reference, PPO/REINFORCE initial policy): call the
same function with ``without_adapters(lora)``, the adapter state with every B set to zero. Then the
low-rank term is exactly zero and the logits are the base model's bitwise (``y + 0 == y``); shapes
and dtypes are unchanged, so a jitted function does not retrace, and no copy of the base weights is
made. ``merge_lora`` folds the adapters into the kernels (``W + scale * A B``) for export with
``jalign.models.hf.save``.

NeMo defaults (``model.peft.lora_tuning``): ``adapter_dim`` 32 (``rank``), ``alpha`` = ``adapter_dim``
(scale 1), ``column_init_method`` xavier (A is Xavier-normal, std ``sqrt(2 / (fan_in + r))``),
``row_init_method`` zero (B), ``target_modules [attention_qkv]``, ``adapter_dropout`` 0.0.
NeMo's names are accepted as targets (``attention_qkv``, ``attention_dense``, ``mlp_fc1``,
``mlp_fc2``, ``attention``, ``mlp``, ``all``). Differences: NeMo's fused projections (qkv, fc1 =
gate+up) share one A per fused kernel; here each of q/k/v (and gate/up) has its own A and B (like
NeMo's unfused ``LoraUnfusedKQVAdapter`` and Hugging Face PEFT). Adapter dropout and
``layer_selection`` are not supported (NeMo's defaults: 0.0 and all layers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.models.llama import DecoderLayer

LORA_RANK = "lora_rank"  # logical axis of the adapter rank: no rule maps it, so it is never sharded

# target -> (submodule of DecoderLayer, kernel, number of input axes, number of output axes)
PROJECTIONS: dict[str, tuple[str, str, int, int]] = {
    "q": ("attn", "q_proj", 1, 2),
    "k": ("attn", "k_proj", 1, 2),
    "v": ("attn", "v_proj", 1, 2),
    "o": ("attn", "o_proj", 2, 1),
    "gate": ("mlp", "gate_proj", 1, 1),
    "up": ("mlp", "up_proj", 1, 1),
    "down": ("mlp", "down_proj", 1, 1),
}
ALL_TARGETS = tuple(PROJECTIONS)
NEMO_TARGETS: dict[str, tuple[str, ...]] = {
    "attention_qkv": ("q", "k", "v"),
    "attention_dense": ("o",),
    "mlp_fc1": ("gate", "up"),
    "mlp_fc2": ("down",),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all": ALL_TARGETS,
}
DEFAULT_TARGETS = NEMO_TARGETS["attention_qkv"]  # NeMo's target_modules default
DEFAULT_RANK = 32  # NeMo's adapter_dim default


class LoRAParam(nnx.LoRAParam):
  """An adapter matrix. A ``nnx.Param`` subclass: ``nnx.split(model, LoRAParam, ...)`` separates the
  adapters from the base weights, and ``nnx.Param`` filters (checkpoints, shardings) still see them."""


class ParamCount(NamedTuple):
  lora: int  # adapter parameters (the trainable ones)
  total: int  # every parameter, adapters included

  @property
  def base(self) -> int:
    return self.total - self.lora

  @property
  def fraction(self) -> float:
    return self.lora / self.total if self.total else 0.0


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  """Projection names (``q k v o gate up down``) from ours and NeMo's names, in a fixed order."""
  if isinstance(targets, str):
    targets = (targets,)
  chosen = set()
  for t in targets:
    if t in PROJECTIONS:
      chosen.add(t)
    elif t in NEMO_TARGETS:
      chosen.update(NEMO_TARGETS[t])
    else:
      raise ValueError(f"unknown LoRA target {t!r}; valid targets: {', '.join(ALL_TARGETS)} "
                       f"or NeMo's {', '.join(NEMO_TARGETS)}")
  if not chosen:
    raise ValueError(f"no LoRA targets given; valid targets: {', '.join(ALL_TARGETS)}")
  return tuple(t for t in ALL_TARGETS if t in chosen)


def _decoder_layers(model: nnx.Module) -> list[DecoderLayer]:
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, DecoderLayer)]
  if not layers:
    raise ValueError(f"{type(model).__name__} has no decoder layers to adapt")
  return layers


def _adapted(model: nnx.Module):
  """(module, target, kernel name) for every adapter of ``model``."""
  for layer in _decoder_layers(model):
    for target, (sub, kernel, _, _) in PROJECTIONS.items():
      module = getattr(layer, sub)
      if hasattr(module, f"{kernel}_lora_a"):
        yield module, target, kernel


def has_lora(model: nnx.Module) -> bool:
  return any(True for _ in _adapted(model))


def lora_targets(model: nnx.Module) -> tuple[str, ...]:
  """The projections that carry adapters."""
  found = {t for _, t, _ in _adapted(model)}
  return tuple(t for t in ALL_TARGETS if t in found)


def add_lora(model: nnx.Module, *, targets: str | Iterable[str] = DEFAULT_TARGETS, rank: int = DEFAULT_RANK,
             alpha: float | None = None, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
  """Add LoRA adapters, in place, to ``targets`` of every decoder layer of ``model``; returns ``model``.

  ``model`` is a ``Transformer`` or any module holding one (e.g. ``ValueModel``). Scale = ``alpha /
  rank`` (``alpha`` defaults to ``rank``, as in NeMo). ``dtype`` is the adapters' storage dtype
  (float32 by default, also for bf16 base weights; they are cast to the compute dtype when used).
  A starts Xavier-normal and B at zero, so the adapted model starts equal to the base model.
  """
  names = resolve_targets(targets)
  if int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer; got {rank!r}")
  rank = int(rank)
  if has_lora(model):
    raise ValueError("the model already has LoRA adapters (merge_lora them first to stack another set)")
  scale = float(alpha if alpha is not None else rank) / rank
  for layer in _decoder_layers(model):
    for target in names:
      sub, kernel, n_in, n_out = PROJECTIONS[target]
      module = getattr(layer, sub)
      w = getattr(module, kernel)
      lead = w.ndim - n_in - n_out  # stacked layer axes (1 for the scanned layers)
      if lead < 0:
        raise ValueError(f"{kernel} has shape {w.shape}: expected {n_in} input and {n_out} output axes")
      axes = tuple(w.get_metadata().get("logical_axes") or (None,) * w.ndim)
      shape = tuple(w.shape)
      fan_in = math.prod(shape[lead:lead + n_in])
      std = math.sqrt(2.0 / (fan_in + rank))  # torch.nn.init.xavier_normal_ on NeMo's linear_in [r, in]
      a = std * jax.random.normal(rngs.params(), shape[:lead + n_in] + (rank,), jnp.float32)
      b = jnp.zeros(shape[:lead] + (rank,) + shape[lead + n_in:], dtype)
      setattr(module, f"{kernel}_lora_a", LoRAParam(a.astype(dtype), logical_axes=axes[:lead + n_in] + (LORA_RANK,)))
      setattr(module, f"{kernel}_lora_b",
              LoRAParam(b, logical_axes=axes[:lead] + (LORA_RANK,) + axes[lead + n_in:]))
      module.lora_scale = scale
  return model


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape) -> jax.Array:
  """``A B`` reshaped to a kernel ``[*lead, *in, *out]`` (float32), batched over the lead axes."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)  # a [*lead, *in, r], b [*lead, r, *out]
  lead_shape = tuple(a.shape[:lead])
  a2 = jnp.asarray(a, jnp.float32).reshape(lead_shape + (-1, a.shape[-1]))
  b2 = jnp.asarray(b, jnp.float32).reshape(lead_shape + (b.shape[lead], -1))
  return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` without adapters whose kernels are ``W + scale * A B`` (in W's dtype).

  ``model`` itself is left as it is; arrays that do not change are shared, not copied. The result
  is a plain model: ``jalign.models.hf.save(merge_lora(model), path)`` exports it.
  """
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state, copy=True)  # new module and Variable objects over the same arrays
  modules = []
  for module, _, kernel in list(_adapted(merged)):
    w = getattr(module, kernel)
    a, b = getattr(module, f"{kernel}_lora_a")[...], getattr(module, f"{kernel}_lora_b")[...]
    delta = lora_delta(a, b, w.shape)
    w.set_value((jnp.asarray(w[...], jnp.float32) + module.lora_scale * delta).astype(w.dtype))
    delattr(module, f"{kernel}_lora_a")
    delattr(module, f"{kernel}_lora_b")
    modules.append(module)
  for module in modules:
    if hasattr(module, "lora_scale"):
      delattr(module, "lora_scale")
  return merged


def _is_b(path) -> bool:
  return any(str(getattr(k, "key", getattr(k, "name", ""))).endswith("_lora_b") for k in path)


def _zeros(x):
  """Zeros like ``x``, placed as ``x`` (a jitted function then sees the same input: no retrace)."""
  if not isinstance(x, jax.Array):
    return np.zeros_like(x)
  if isinstance(x, jax.core.Tracer) or not x.committed:
    return jnp.zeros_like(x)
  return jnp.zeros_like(x, device=x.sharding)


def without_adapters(tree):
  """The adapters switched off: every LoRA B set to zero (A untouched), so the low-rank term is 0.

  ``tree`` is an ``nnx.State`` (the adapters alone or the whole model), a pure dict of arrays, or a
  module (then a new module over the same base arrays comes back). Shapes, dtypes and placements do
  not change, so a jitted function takes it without retracing; the logits equal the base model's.
  """
  if isinstance(tree, nnx.Module):
    graphdef, state = nnx.split(tree)
    return nnx.merge(graphdef, without_adapters(state), copy=True)

  def zero(path, leaf):
    if not _is_b(path):
      return leaf
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(_zeros(leaf.get_value()))
    return _zeros(leaf)

  return jax.tree_util.tree_map_with_path(zero, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(model) -> ParamCount:
  """(adapter parameters, all parameters) of a module or state; works on ``nnx.eval_shape`` models."""
  state = nnx.state(model) if isinstance(model, nnx.Module) else model
  lora = total = 0
  for _, v in nnx.to_flat_state(state):
    if not isinstance(v, nnx.Param):
      continue
    n = math.prod(v.shape)
    total += n
    if isinstance(v, nnx.LoRAParam):
      lora += n
  return ParamCount(lora=lora, total=total)
