"""The Llama-family decoder in Flax NNX: Llama 2/3/3.1, Mistral, Qwen2 and SmolLM2.

Reads top to bottom: the config and its presets, then the modules from the smallest up (norm, rotary
embedding, attention, MLP, decoder layer, the stacked transformer). Parameters carry logical axis
names (``jalign.parallel.logical``) in their ``logical_axes`` metadata; one rules table maps them to
the mesh. (Not Flax's ``out_sharding``: Flax would read names without a rule as mesh axes.) Layers are
created and run with ``nnx.scan``, so compile time does not grow with depth.

Weight layouts (H hidden, Hq/Hkv heads, D head dim, F MLP width, V vocabulary, L layers):
  embed [V,H]; per layer q [H,Hq,D], k/v [H,Hkv,D], o [Hq,D,H], gate/up [H,F], down [F,H];
  lm_head [H,V] (absent when tied to the embedding).
LoRA adapters (``jalign.models.lora``) add ``<kernel>_lora_a``/``_lora_b`` next to a kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.kernels import cached_attention, decode_attention, flash_attention
from jalign.parallel import pipeline
from jalign.parallel.logical import (ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB,
                                     BATCH, CACHE_LENGTH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, LENGTH, MLP,
                                     NORM, VOCAB, active_mesh, constrain)

ARCHITECTURES = ("llama", "mistral", "qwen2")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 frequency scaling ("llama3" in Hugging Face configs)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: q/k/v projections have biases
  sliding_window: int | None = None  # Mistral
  max_position_embeddings: int = 4096
  architecture: str = "llama"  # llama | mistral | qwen2: the Hugging Face class written on save
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # a key of REMAT_POLICIES
  attention_impl: str | None = None  # see jalign.kernels.flash_attention
  decode_attention_impl: str | None = None  # see jalign.kernels.decode_attention
  # Pipeline parallelism (jalign.parallel.pipeline): stages = the mesh's pipeline axis.
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1
  pipeline_repeats: int = 1  # > 1: the circular (interleaved) schedule

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if self.pipeline_stages > 1 and self.num_layers % (self.pipeline_stages * self.pipeline_repeats):
      raise ValueError(f"{self.num_layers} layers do not split into {self.pipeline_stages} stages x "
                       f"{self.pipeline_repeats} repeats")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_params(self) -> int:
    h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * h * f + 2 * h
    head = 0 if self.tie_word_embeddings else h * self.vocab_size
    return self.vocab_size * h + self.num_layers * per_layer + h + head

  @classmethod
  def preset(cls, name: str, **overrides) -> "LlamaConfig":
    if name not in PRESETS:
      raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000,
               eos_token_id=128001)
_LLAMA31 = dict(_LLAMA3, rope_scaling=RopeScaling(), max_position_embeddings=131072,
                eos_token_id=(128001, 128008, 128009))
PRESETS: dict[str, LlamaConfig] = {
    # The embedded test model: vocabulary of the tokenizer shipped in jalign/assets/tiny_tokenizer.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192,
                                bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # Between the two: a model of ~2 GB of float32 parameters, for memory tests of sharded building.
    "llama-500m": LlamaConfig(vocab_size=32768, hidden_size=1536, intermediate_size=4096, num_layers=16,
                              num_heads=12, num_kv_heads=4, max_position_embeddings=4096,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama3.2-1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                               num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                               **dict(_LLAMA31, rope_scaling=RopeScaling(factor=32.0))),
    "llama3.2-3b": LlamaConfig(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                               num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
                               **dict(_LLAMA31, rope_scaling=RopeScaling(factor=32.0))),
    "llama3-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, max_position_embeddings=8192, **_LLAMA3),
    "llama3-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, max_position_embeddings=8192, **_LLAMA3),
    "llama3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_layers=32,
                               num_heads=32, num_kv_heads=8, **_LLAMA31),
    "llama3.1-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                                num_heads=64, num_kv_heads=8, **_LLAMA31),
    "llama3.1-405b": LlamaConfig(hidden_size=16384, intermediate_size=53248, num_layers=126,
                                 num_heads=128, num_kv_heads=8, **_LLAMA31),
    "mistral-7b": LlamaConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1e6,
                              max_position_embeddings=32768, architecture="mistral",
                              bos_token_id=1, eos_token_id=2),
    "qwen2-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1e6,
                            rms_norm_eps=1e-6, attention_bias=True, max_position_embeddings=32768,
                            architecture="qwen2", eos_token_id=151645),
}


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, ``[L,B,S,Hkv,D]``; slot i of a row holds position i."""
  k: jax.Array
  v: jax.Array

  @property
  def max_length(self) -> int:
    return self.k.shape[2]


def _param(rngs: nnx.Rngs, shape, names, dtype, std: float | None) -> nnx.Param:
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(names))


def _with_lora(module: nnx.Module, name: str, x, y):
  """``y`` plus the LoRA update ``scale * (x A) B`` when ``jalign.models.lora`` added one on ``name``.

  A is ``[*in, r]`` and B ``[r, *out]`` for a kernel ``[*in, *out]``; without adapters ``y`` comes
  back untouched, so the base model traces to the same program.
  """
  a = getattr(module, f"{name}_lora_a", None)
  if a is None:
    return y
  a, b = a[...].astype(x.dtype), getattr(module, f"{name}_lora_b")[...].astype(x.dtype)
  z = jnp.tensordot(x, a, axes=a.ndim - 1)
  return y + module.lora_scale * jnp.tensordot(z, b, axes=1).astype(y.dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, (dim,), (NORM,), param_dtype, std=None)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """Per-pair rotation frequencies, with Llama 3.1 scaling when the config asks for it."""
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  s = config.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions, config: LlamaConfig, dtype):
  """cos and sin ``[B,T,1,D]`` for the half-split rotation used by Hugging Face checkpoints."""
  inv = jnp.asarray(rope_inverse_frequencies(config))
  angles = positions.astype(jnp.float32)[..., None] * inv
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    h, d, hq, hkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    pd, std = config.param_dtype, config.initializer_range
    self.q_proj = _param(rngs, (h, hq, d), (EMBED, HEADS, HEAD_DIM), pd, std)
    self.k_proj = _param(rngs, (h, hkv, d), (EMBED, KV_HEADS, HEAD_DIM), pd, std)
    self.v_proj = _param(rngs, (h, hkv, d), (EMBED, KV_HEADS, HEAD_DIM), pd, std)
    self.o_proj = _param(rngs, (hq, d, h), (HEADS, HEAD_DIM, EMBED), pd, std)
    if config.attention_bias:
      self.q_bias = _param(rngs, (hq, d), (HEADS, HEAD_DIM), pd, 0.0)
      self.k_bias = _param(rngs, (hkv, d), (KV_HEADS, HEAD_DIM), pd, 0.0)
      self.v_bias = _param(rngs, (hkv, d), (KV_HEADS, HEAD_DIM), pd, 0.0)

  def _project(self, x, name):
    y = jnp.einsum("bth,hnd->btnd", x, getattr(self, f"{name}_proj")[...].astype(x.dtype))
    y = _with_lora(self, f"{name}_proj", x, y)
    if self.config.attention_bias:
      y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
    return y

  def __call__(self, x, cos, sin, positions, segment_ids, cache, branch_ids=None):
    cfg = self.config
    q = constrain(apply_rope(self._project(x, "q"), cos, sin), (BATCH, LENGTH, ACT_HEADS, None))
    k = constrain(apply_rope(self._project(x, "k"), cos, sin), (BATCH, LENGTH, ACT_KV_HEADS, None))
    v = constrain(self._project(x, "v"), (BATCH, LENGTH, ACT_KV_HEADS, None))
    if cache is None:
      o = flash_attention(q, k, v, causal=True, segment_ids=segment_ids, branch_ids=branch_ids,
                          impl=cfg.attention_impl, sliding_window=cfg.sliding_window)
    else:
      # Every layer's cache ``[L,B,S,Hkv,D]`` with this layer's index: this layer's slice is read, the
      # new keys and values written into it and the slice written back into the stack in place, so a
      # decode step copies each layer's cache once rather than the whole cache in and out of the loop.
      k_all, v_all, layer = cache
      rows = jnp.arange(x.shape[0])[:, None]
      k_cache = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
      v_cache = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
      k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype))
      v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype))
      k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_cache, layer, 0)
      v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_cache, layer, 0)
      if x.shape[1] == 1:  # one token per row: the ragged decode kernel, stopping at each row's length
        o = decode_attention(q[:, 0], k_cache.astype(q.dtype), v_cache.astype(q.dtype), positions[:, 0] + 1,
                             sliding_window=cfg.sliding_window, impl=cfg.decode_attention_impl)[:, None]
      else:
        o = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), positions,
                             sliding_window=cfg.sliding_window)
      cache = (k_all, v_all)
    out = _with_lora(self, "o_proj", o, jnp.einsum("btnd,ndh->bth", o, self.o_proj[...].astype(x.dtype)))
    return constrain(out, (BATCH, LENGTH, ACT_EMBED)), cache


class FeedForward(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    h, f = config.hidden_size, config.intermediate_size
    pd, std = config.param_dtype, config.initializer_range
    self.gate_proj = _param(rngs, (h, f), (EMBED, MLP), pd, std)
    self.up_proj = _param(rngs, (h, f), (EMBED, MLP), pd, std)
    self.down_proj = _param(rngs, (f, h), (MLP, EMBED), pd, std)

  def __call__(self, x):
    gate = _with_lora(self, "gate_proj", x, x @ self.gate_proj[...].astype(x.dtype))
    up = _with_lora(self, "up_proj", x, x @ self.up_proj[...].astype(x.dtype))
    hidden = constrain(jax.nn.silu(gate) * up, (BATCH, LENGTH, ACT_MLP))
    down = _with_lora(self, "down_proj", hidden, hidden @ self.down_proj[...].astype(x.dtype))
    return constrain(down, (BATCH, LENGTH, ACT_EMBED))


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    pd = config.param_dtype
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.mlp = FeedForward(config, rngs=rngs)

  def __call__(self, x, cos, sin, positions, segment_ids, cache, branch_ids=None):
    attn_out, cache = self.attn(self.input_norm(x), cos, sin, positions, segment_ids, cache, branch_ids)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, cache


class Transformer(nnx.Module):
  """Decoder-only transformer; ``model(tokens)`` gives float32 logits ``[B,T,V]``.

  With ``cache=`` (from ``init_cache``) it returns ``(logits, cache)`` and writes the keys and
  values of ``tokens`` at their ``positions``: call it once on the prompt (prefill), then on one
  token per row at a time.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, with_lm_head: bool = True):
    self.config = config
    self.embed = _param(rngs, (config.vocab_size, config.hidden_size), (VOCAB, EMBED),
                        config.param_dtype, config.initializer_range)

    # One layer at a time (a scan, not a vmap), so that an initialiser jitted over the stack holds
    # one layer's random draws at a time besides its outputs.
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.scan(in_axes=(0,), out_axes=0, length=config.num_layers,
              transform_metadata={nnx.PARTITION_NAME: LAYERS, "logical_axes": LAYERS})
    def make_layers(rngs):
      return DecoderLayer(config, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                              param_dtype=config.param_dtype, rngs=rngs)
    if with_lm_head and not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), (EMBED, VOCAB),
                            config.param_dtype, config.initializer_range)

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    cfg = self.config
    shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    # Rows over the data-parallel axes and KV heads over tensor, like the activations that fill it.
    names = (None, BATCH, CACHE_LENGTH, ACT_KV_HEADS, None)
    return KVCache(k=constrain(jnp.zeros(shape, dtype), names), v=constrain(jnp.zeros(shape, dtype), names))

  def lm_head_kernel(self) -> jax.Array:
    """The ``[H,V]`` output projection (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...].T
    if not hasattr(self, "lm_head"):
      raise ValueError("this model was built without an output projection (with_lm_head=False)")
    return self.lm_head[...]

  def hidden_states(self, tokens, *, positions=None, segment_ids=None, cache: KVCache | None = None,
                    branch_ids=None):
    """Final-norm hidden states ``[B,T,H]`` (and the updated cache when one is given).

    ``branch_ids`` (with ``segment_ids``): rows where a shared prefix (branch 0) is followed by
    branches that each see it and themselves only (``jalign.kernels.flash_attention``)."""
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B,T] integers; got shape {tokens.shape}")
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids cannot be combined with a KV cache: one sequence per row when decoding")
      segment_ids = jnp.asarray(segment_ids)
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    cos, sin = rope_tables(positions, cfg, dtype)

    def body(x, layer):
      return layer(x, cos, sin, positions, segment_ids, None, branch_ids)[0]

    def cached_body(carry, layer, index):
      x, k_all, v_all = carry
      x, (k_all, v_all) = layer(x, cos, sin, positions, None, (k_all, v_all, index))
      return x, k_all, v_all

    if branch_ids is not None and (cache is not None or segment_ids is None or cfg.pipeline_stages > 1):
      raise ValueError("branch_ids need segment_ids, no KV cache and no pipeline stages")
    if cfg.pipeline_stages > 1 and cache is None:
      x = self._pipelined_layers(x, positions, segment_ids)
      return self.final_norm(x)
    if cache is not None:  # decoding: nothing to differentiate, so no remat
      indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      x, k_all, v_all = nnx.scan(cached_body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)(
          (x, cache.k, cache.v), self.layers, indices)
      return self.final_norm(x), KVCache(k=k_all, v=v_all)
    if cfg.remat != "none":
      body = nnx.remat(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
    return self.final_norm(x)

  def _pipelined_layers(self, x, positions, segment_ids):
    """The layers as pipeline stages over the ``pipeline`` mesh axis (see jalign.parallel.pipeline)."""
    cfg = self.config
    stages, repeats, micro = cfg.pipeline_stages, cfg.pipeline_repeats, cfg.pipeline_microbatches
    b = x.shape[0]
    if b % micro:
      raise ValueError(f"a batch of {b} rows does not split into {micro} pipeline micro-batches")
    graphdef, state = nnx.split(self.layers)
    policy = REMAT_POLICIES[cfg.remat]

    def stage_fn(params, h, aux):
      pos, seg = aux
      cos, sin = rope_tables(pos, cfg, h.dtype)

      def one_layer(h, layer_params):
        h, _ = nnx.merge(graphdef, layer_params)(h, cos, sin, pos, seg, None)
        return h, None

      if cfg.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
      return jax.lax.scan(one_layer, h, params)[0]

    # Strided micro-batches (rows m, m+M, ...), so that rows sharded over data stay where they are.
    split = lambda a: a.reshape(b // micro, micro, *a.shape[1:]).swapaxes(0, 1)
    merge = lambda a: a.swapaxes(0, 1).reshape(b, *a.shape[2:])
    seg = segment_ids if segment_ids is not None else jnp.zeros(positions.shape, jnp.int32)
    aux = (split(positions), split(seg))
    axis = "pipeline" if active_mesh() is not None else None
    per = cfg.num_layers // (stages * repeats)
    if repeats == 1:
      params = jax.tree.map(lambda p: p.reshape(stages, per, *p.shape[1:]), state)
      ys = pipeline.gpipe(stage_fn, params, split(x), aux, spmd_axis_name=axis)
    else:
      params = jax.tree.map(lambda p: p.reshape(repeats, stages, per, *p.shape[1:]), state)
      ys = pipeline.circular(stage_fn, params, split(x), aux, repeats=repeats, spmd_axis_name=axis)
    return merge(ys)

  def logits(self, hidden) -> jax.Array:
    kernel = self.lm_head_kernel().astype(hidden.dtype)
    out = jnp.einsum("bth,hv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    return constrain(out, (BATCH, LENGTH, ACT_VOCAB))

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    out = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, cache=cache)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache
