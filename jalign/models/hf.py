"""Hugging Face checkpoint folders in and out: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

``load(path)`` reads ``config.json`` and the (possibly sharded) safetensors weights, converting each
tensor to this package's layout as it is read: with a mesh, every device reads only its own slice,
straight into its sharding, so a 70B checkpoint never needs two full copies in host memory.
``save(model, path)`` writes a folder that ``transformers`` loads with the same logits; it writes
into a temporary folder first and renames it at the end, so a failure leaves nothing half-written.
Reward models (sequence classification folders, ``ValueModel``) are ``jalign.models.hf_value``'s,
which builds on this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jalign.models.heads import ValueModel
from jalign.models.llama import LlamaConfig, RopeScaling, Transformer
from jalign.models.safetensors_io import CheckpointError, SafetensorsReader, new_folder, write_file_lazy
from jalign.parallel.logical import variable_spec

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, source: Path | str = "config.json", **overrides) -> LlamaConfig:
  """A LlamaConfig from a Hugging Face config dict; ``source`` names the file in errors."""
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    model_type = hf.get("model_type")
    if not archs and model_type in HF_CLASS:
      arch = HF_CLASS[model_type]
    elif any(a.endswith("ForSequenceClassification") for a in archs):
      raise CheckpointError(f"{source}: {archs[0]} is a reward model, not a language model; name it where a "
                            "reward model goes (critic.reward_model, critic.init, reinforce.reward_model: hf:<folder>)")
    else:
      raise CheckpointError(f"{source}: unsupported architecture {archs or model_type!r}; "
                            f"supported: {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=true is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
  if family == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointError(f"{source}: Qwen2 use_sliding_window=true is not supported")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if key not in hf:
      raise CheckpointError(f"{source}: missing key {key!r}")

  rope = dict(hf.get("rope_parameters") or {})  # transformers 5 style
  legacy = hf.get("rope_scaling") or {}
  if not rope:
    rope = dict(legacy)
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    scaling = RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
  elif rope_type == "default":
    scaling = None
  else:
    raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")

  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(theta), rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
      sliding_window=hf.get("sliding_window") if family == "mistral" else None,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      architecture=family, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02))
  fields.update(overrides)
  try:
    return LlamaConfig(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
  rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
  out = {
      "architectures": [HF_CLASS[cfg.architecture]], "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": rope,
      # Older readers (transformers 4.x, TensorRT-LLM's converter) look for these two instead.
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling is None else dict(rope),
      "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id, "dtype": dtype, "use_cache": True,
  }
  if cfg.architecture == "llama":
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  elif cfg.architecture == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  elif cfg.architecture == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# ----------------------------------------------------------------------------------------------
# The tensor map: our parameter path <-> Hugging Face name, with the layout change each way.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorMap:
  ours: tuple[str, ...]
  hf: str  # "{i}" stands for the layer index of stacked parameters
  hf_shape: Callable[[LlamaConfig], tuple[int, ...]]
  to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def _same(w, c):
  return w


def _t(w, c):
  return w.T


def tensor_maps(cfg: LlamaConfig, *, with_lm_head: bool = True) -> list[TensorMap]:
  h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
  hq, hkv = cfg.num_heads, cfg.num_kv_heads
  layer = "model.layers.{i}."

  def proj(name, heads):
    return TensorMap(("layers", "attn", f"{name}_proj"), layer + f"self_attn.{name}_proj.weight",
                     lambda c: (heads * d, h),
                     lambda w, c: w.T.reshape(h, heads, d),
                     lambda p, c: p.reshape(h, heads * d).T)

  def bias(name, heads):
    return TensorMap(("layers", "attn", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                     lambda c: (heads * d,),
                     lambda w, c: w.reshape(heads, d),
                     lambda p, c: p.reshape(heads * d))

  maps = [
      TensorMap(("embed",), "model.embed_tokens.weight", lambda c: (v, h), _same, _same),
      TensorMap(("layers", "input_norm", "scale"), layer + "input_layernorm.weight",
                lambda c: (h,), _same, _same),
      proj("q", hq), proj("k", hkv), proj("v", hkv),
      TensorMap(("layers", "attn", "o_proj"), layer + "self_attn.o_proj.weight",
                lambda c: (h, hq * d),
                lambda w, c: w.T.reshape(hq, d, h),
                lambda p, c: p.reshape(hq * d, h).T),
      TensorMap(("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight",
                lambda c: (h,), _same, _same),
      TensorMap(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", lambda c: (f, h), _t, _t),
      TensorMap(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", lambda c: (f, h), _t, _t),
      TensorMap(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", lambda c: (h, f), _t, _t),
      TensorMap(("final_norm", "scale"), "model.norm.weight", lambda c: (h,), _same, _same),
  ]
  if cfg.attention_bias:
    maps += [bias("q", hq), bias("k", hkv), bias("v", hkv)]
  if with_lm_head and not cfg.tie_word_embeddings:
    maps.append(TensorMap(("lm_head",), "lm_head.weight", lambda c: (v, h), _t, _t))
  return maps


def hf_names(m: TensorMap, cfg: LlamaConfig) -> list[str]:
  return [m.hf.format(i=i) for i in range(cfg.num_layers)] if m.per_layer else [m.hf]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict:
  cfg_path = path / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path}: not found; a Hugging Face checkpoint folder needs config.json")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def weight_files(path: Path) -> list[Path]:
  """The safetensors files of a checkpoint folder, checking that an index's shards all exist."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
      raise CheckpointError(f"{index}: {len(missing)} of {len(shards)} shards are missing from "
                            f"{path}: {', '.join(missing)}")
    return [path / s for s in shards]
  single = path / "model.safetensors"
  if single.is_file():
    return [single]
  found = sorted(path.glob("*.safetensors"))
  if not found:
    raise CheckpointError(f"{path}: no *.safetensors weights (only safetensors checkpoints are read)")
  return found


def _check_tensors(reader: SafetensorsReader, maps: list[TensorMap], cfg: LlamaConfig, path: Path):
  missing = []
  for m in maps:
    for name in hf_names(m, cfg):
      if name not in reader:
        missing.append(name)
        continue
      want, got = m.hf_shape(cfg), reader.shape(name)
      if tuple(got) != tuple(want):
        raise CheckpointError(f"{reader.path(name)}: tensor {name!r} has shape {tuple(got)}; "
                              f"the model config implies {tuple(want)}")
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:5])}{more}")


def _host_value(reader, m: TensorMap, cfg: LlamaConfig, dtype, index=None) -> np.ndarray:
  """Our-layout value of one parameter (or the ``index`` slice of it), read layer by layer."""
  if not m.per_layer:
    full = m.to_ours(reader.get(m.hf), cfg)
    # A copy, never a view: a device buffer may alias the array it is made from, and a view would keep
    # the whole tensor alive for every device's slice.
    return np.array(full[index] if index else full, dtype=dtype, copy=True)
  layers = range(cfg.num_layers)
  rest: tuple = ()
  if index:
    layers = range(cfg.num_layers)[index[0]]
    rest = tuple(index[1:])
  parts = []
  for i in layers:
    value = m.to_ours(reader.get(m.hf.format(i=i)), cfg)
    parts.append(np.array(value[rest] if rest else value, dtype=dtype, copy=True))
  return np.stack(parts)


def _place(reader, m: TensorMap, cfg, var, dtype, mesh):
  """The parameter ``var`` read from ``reader``, on the host or straight into its mesh sharding."""
  if mesh is None:
    return jnp.asarray(_host_value(reader, m, cfg, dtype))
  sharding = NamedSharding(mesh, variable_spec(var, mesh=mesh))
  return jax.make_array_from_callback(var.shape, sharding,
                                      lambda idx: _host_value(reader, m, cfg, dtype, idx))


def load_weights(reader: SafetensorsReader, cfg: LlamaConfig, *, mesh=None, with_lm_head=True,
                 source: Path | str = "") -> Transformer:
  """Build a Transformer from tensors with Hugging Face names."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), with_lm_head=with_lm_head))
  return read_module(reader, abstract, tensor_maps(cfg, with_lm_head=with_lm_head), cfg, mesh=mesh, source=source)


def read_module(reader: SafetensorsReader, abstract: nnx.Module, maps: list[TensorMap], cfg: LlamaConfig, *,
                mesh=None, source: Path | str = "", zeros: tuple[tuple[str, ...], ...] = ()) -> nnx.Module:
  """``abstract`` (an ``nnx.eval_shape`` module) with every parameter read from ``reader`` by ``maps`` in
  its own dtype, or made zero (``zeros``: parameters the checkpoint has no tensor for); with ``mesh``,
  each straight into its sharding."""
  _check_tensors(reader, maps, cfg, Path(source))
  graphdef, state = nnx.split(abstract)
  variables = dict(nnx.to_flat_state(state))
  unmapped = set(variables) - {m.ours for m in maps} - set(zeros)
  if unmapped:
    raise CheckpointError(f"{source}: no Hugging Face tensor maps to {sorted(unmapped)}")
  for m in maps:
    var = variables[m.ours]
    var.set_value(_place(reader, m, cfg, var, np.dtype(var.dtype), mesh))
  for path in zeros:
    var = variables[path]
    value = np.zeros(var.shape, np.dtype(var.dtype))
    var.set_value(jnp.asarray(value) if mesh is None else jax.make_array_from_callback(
        var.shape, NamedSharding(mesh, variable_spec(var, mesh=mesh)), lambda idx, value=value: value[idx]))
  return nnx.merge(graphdef, state)


def load(path, *, dtype="float32", mesh=None, compute_dtype=None, **config_overrides) -> Transformer:
  """Load a Hugging Face checkpoint folder.

  ``dtype`` is the parameter dtype; the compute dtype defaults to it (``compute_dtype`` overrides).
  With ``mesh``, parameters are placed by the logical-axis rules active at the call
  (``flax.nnx.logical_axis_rules``).
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a folder")
  cfg = config_from_hf(read_config_file(path), path / "config.json", param_dtype=str(jnp.dtype(dtype)),
                       dtype=str(jnp.dtype(compute_dtype or dtype)), **config_overrides)
  reader = SafetensorsReader(weight_files(path))
  return load_weights(reader, cfg, mesh=mesh, source=path)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _param_arrays(model: Transformer) -> dict[tuple[str, ...], jax.Array]:
  return {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_tensors(model: Transformer, out_dtype) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
  """Every tensor of ``model`` by its Hugging Face name: ``(shape, produce)``, where ``produce()`` fetches
  it from the devices in Hugging Face's layout (float32 when its dtype is not ``out_dtype``) only when
  called, so that a writer holds one tensor at a time."""
  cfg = model.config
  arrays = _param_arrays(model)
  out = {}
  for m in tensor_maps(cfg, with_lm_head=("lm_head",) in arrays):
    array = arrays[m.ours]
    for i, name in enumerate(hf_names(m, cfg)):
      def produce(array=array, i=i, m=m):
        value = np.asarray(jax.device_get(array[i] if m.per_layer else array))
        return m.to_hf(value.astype(np.float32) if value.dtype != out_dtype else value, cfg)
      out[name] = (m.hf_shape(cfg), produce)
  return out


def save(model: Transformer, path, *, dtype=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         tokenizer=None, overwrite: bool = False) -> Path:
  """Write a language model as a Hugging Face folder (config.json, safetensors shards, index); a
  ``ValueModel`` (a reward model, a critic) is ``jalign.models.hf_value.save``'s.

  ``dtype`` defaults to the parameter dtype. ``tokenizer`` (a ``jalign.data.Tokenizer``) is saved
  alongside when given. The folder appears only once complete.
  """
  if isinstance(model, ValueModel):
    raise TypeError("a ValueModel is saved as a sequence classification model: jalign.models.hf_value.save")
  cfg = model.config
  out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": config_to_hf(cfg, "")["eos_token_id"],
         "pad_token_id": cfg.pad_token_id}
  return write_folder(path, hf_tensors(model, out_dtype), out_dtype,
                      {"config.json": config_to_hf(cfg, str(out_dtype)), "generation_config.json": gen},
                      max_shard_bytes=max_shard_bytes, tokenizer=tokenizer, overwrite=overwrite)


def write_folder(path, tensors: dict, out_dtype, files: dict[str, dict], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None, overwrite: bool = False) -> Path:
  """A checkpoint folder of ``tensors`` (``hf_tensors``' ``name: (shape, produce)``) written as
  ``out_dtype`` in shards of at most ``max_shard_bytes``, the JSON ``files`` and the ``tokenizer``."""
  path = Path(path)
  entries = [(name, shape, out_dtype, produce) for name, (shape, produce) in tensors.items()]
  shards, current, size = [], [], 0
  for e in entries:
    nbytes = int(np.prod(e[1])) * out_dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(e)
    size += nbytes
  shards.append(current)

  with new_folder(path, overwrite=overwrite) as tmp:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      write_file_lazy(tmp / fname, shard, metadata={"format": "pt"})
      for name, shape, _, _ in shard:
        weight_map[name] = fname
        total += int(np.prod(shape)) * out_dtype.itemsize
    if len(shards) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, content in files.items():
      (tmp / name).write_text(json.dumps(content, indent=2))
    if tokenizer is not None:
      tokenizer.save(tmp)
  return path
