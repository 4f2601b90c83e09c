"""TensorRT-LLM checkpoints of a policy, for rollout engines built with ``trtllm-build``.

``export_checkpoint(model, path, tp_size=, pp_size=)`` writes TensorRT-LLM's checkpoint format: a
``config.json`` and one ``rank{N}.safetensors`` per (tensor, pipeline) rank holding that rank's slices,
already split the way TensorRT-LLM's own Llama converter splits them (rank = pp_rank * tp_size + tp_rank;
fused QKV per rank, KV heads repeated when there are fewer than tp_size; the gated MLP's ``fc`` is the
gate projection and its ``gate`` the up projection; the LM head's vocabulary zero-padded to a multiple
of tp_size; each pipeline rank's layers numbered from 0, the first ranks taking one layer more when they
do not divide evenly). Qwen2 models are written as Llama with ``attn_bias``, which they are.

``build_engine(checkpoint, engine_dir, ...)`` runs ``trtllm-build`` on such a folder. TensorRT-LLM itself
is optional: it is not a dependency of this package and cannot be installed on machines without NVIDIA's
package index, so the build step needs it installed by hand on a GPU machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jalign.models import hf
from jalign.models.llama import LlamaConfig, Transformer
from jalign.models.safetensors_io import new_folder, write_file_lazy

DTYPES = ("float32", "float16", "bfloat16")


def layer_ranges(num_layers: int, pp_size: int) -> list[range]:
  """The layers of each pipeline rank, as TensorRT-LLM assigns them (first ranks take the remainder)."""
  if not 1 <= pp_size <= num_layers:
    raise ValueError(f"pp_size={pp_size}: must be between 1 and the model's {num_layers} layers")
  base, extra = divmod(num_layers, pp_size)
  starts = np.cumsum([0] + [base + (r < extra) for r in range(pp_size)])
  return [range(int(starts[r]), int(starts[r + 1])) for r in range(pp_size)]


def checkpoint_config(cfg: LlamaConfig, *, dtype: str, tp_size: int = 1, pp_size: int = 1) -> dict:
  """TensorRT-LLM's ``config.json`` for a Llama-family model."""
  if cfg.sliding_window is not None:
    raise ValueError(f"a sliding-window ({cfg.sliding_window}) model cannot be exported as TensorRT-LLM's "
                     "Llama; only full-attention models are")
  scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    # TensorRT-LLM reads Hugging Face's rope_scaling dict; older releases key the kind as "type".
    scaling = {"type": "llama3", "rope_type": "llama3", "factor": s.factor,
               "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings}
  return {
      "architecture": "LlamaForCausalLM", "dtype": dtype, "logits_dtype": "float32",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_size": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
      "norm_epsilon": cfg.rms_norm_eps, "position_embedding_type": "rope_gpt_neox",
      "max_position_embeddings": cfg.max_position_embeddings, "rotary_base": cfg.rope_theta,
      "rotary_scaling": scaling,
      # The LM head is written out even for tied models (a separate copy is always valid; sharing the
      # table across pipeline ranks is not).
      "tie_word_embeddings": False, "share_embedding_table": False,
      "use_parallel_embedding": False, "embedding_sharding_dim": 0,
      "attn_bias": cfg.attention_bias, "mlp_bias": False,
      "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size},
      "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
  }


def _check_parallelism(cfg: LlamaConfig, tp_size: int, pp_size: int):
  if tp_size < 1 or cfg.num_heads % tp_size:
    raise ValueError(f"tp_size={tp_size}: must divide the {cfg.num_heads} attention heads")
  if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
    raise ValueError(f"tp_size={tp_size}: the {cfg.num_kv_heads} key/value heads must divide it or be "
                     "divisible by it")
  if cfg.intermediate_size % tp_size:
    raise ValueError(f"tp_size={tp_size}: must divide the MLP's {cfg.intermediate_size} units")
  layer_ranges(cfg.num_layers, pp_size)


def _heads_of_rank(w: np.ndarray, heads: int, tp_size: int, tp_rank: int) -> np.ndarray:
  """Rows ``[heads * D, ...]`` of one projection -> this rank's heads; with fewer heads than ranks,
  each head serves ``tp_size // heads`` consecutive ranks."""
  per_head = w.reshape(heads, -1, *w.shape[1:])
  if heads >= tp_size:
    part = np.split(per_head, tp_size)[tp_rank]
  else:
    part = per_head[tp_rank // (tp_size // heads)][None]
  return part.reshape(-1, *w.shape[1:])


def _rank_entries(cfg: LlamaConfig, hf_tensor, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int,
                  dtype: np.dtype) -> list:
  """``(name, shape, dtype, produce)`` of one rank's tensors; ``hf_tensor(name)`` gives a Hugging Face
  tensor (``[out, in]`` like TensorRT-LLM's) as numpy."""
  d, h = cfg.head_dim, cfg.hidden_size
  kv_per_rank = max(cfg.num_kv_heads // tp_size, 1)
  qkv_rows = (cfg.num_heads // tp_size + 2 * kv_per_rank) * d
  entries = []

  def add(name, shape, produce):
    entries.append((name, tuple(shape), dtype, produce))

  def split(name, axis):
    return lambda: np.split(hf_tensor(name), tp_size, axis=axis)[tp_rank]

  if pp_rank == 0:
    add("transformer.vocab_embedding.weight", (cfg.vocab_size, h), lambda: hf_tensor("model.embed_tokens.weight"))
  for local, i in enumerate(layer_ranges(cfg.num_layers, pp_size)[pp_rank]):
    src, dst = f"model.layers.{i}.", f"transformer.layers.{local}."

    def qkv(kind, src=src):
      parts = [_heads_of_rank(hf_tensor(f"{src}self_attn.{p}_proj.{kind}"), n, tp_size, tp_rank)
               for p, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads))]
      return np.concatenate(parts, axis=0)

    f_rank = cfg.intermediate_size // tp_size
    add(dst + "input_layernorm.weight", (h,), lambda src=src: hf_tensor(src + "input_layernorm.weight"))
    add(dst + "attention.qkv.weight", (qkv_rows, h), lambda qkv=qkv: qkv("weight"))
    if cfg.attention_bias:
      add(dst + "attention.qkv.bias", (qkv_rows,), lambda qkv=qkv: qkv("bias"))
    add(dst + "attention.dense.weight", (h, cfg.num_heads // tp_size * d), split(src + "self_attn.o_proj.weight", 1))
    add(dst + "post_layernorm.weight", (h,), lambda src=src: hf_tensor(src + "post_attention_layernorm.weight"))
    add(dst + "mlp.fc.weight", (f_rank, h), split(src + "mlp.gate_proj.weight", 0))
    add(dst + "mlp.gate.weight", (f_rank, h), split(src + "mlp.up_proj.weight", 0))
    add(dst + "mlp.proj.weight", (h, f_rank), split(src + "mlp.down_proj.weight", 1))
  if pp_rank == pp_size - 1:
    add("transformer.ln_f.weight", (h,), lambda: hf_tensor("model.norm.weight"))
    padded = -(-cfg.vocab_size // tp_size) * tp_size

    def lm_head():
      name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
      w = hf_tensor(name)
      w = np.concatenate([w, np.zeros((padded - cfg.vocab_size, h), w.dtype)]) if padded > cfg.vocab_size else w
      return np.split(w, tp_size)[tp_rank]

    add("lm_head.weight", (padded // tp_size, h), lm_head)
  return entries


def export_checkpoint(model: Transformer, path, *, tp_size: int = 1, pp_size: int = 1, dtype: str | None = None,
                      tokenizer=None, overwrite: bool = False) -> Path:
  """Write ``model`` as a TensorRT-LLM checkpoint folder for ``tp_size`` x ``pp_size`` GPUs.

  ``dtype`` (float32, float16 or bfloat16) defaults to the parameter dtype. ``tokenizer`` (a
  ``jalign.data.Tokenizer``) is saved alongside when given, for the runtime that decodes the engine's
  tokens. The folder appears only once complete; an existing non-empty one is replaced only with
  ``overwrite``.
  """
  if not isinstance(model, Transformer):
    raise TypeError(f"a TensorRT-LLM checkpoint holds a causal language model (Transformer), not a "
                    f"{type(model).__name__}")
  cfg = model.config
  dtype = str(jnp.dtype(dtype or cfg.param_dtype))
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: TensorRT-LLM checkpoints here are one of {DTYPES}")
  _check_parallelism(cfg, tp_size, pp_size)
  config = checkpoint_config(cfg, dtype=dtype, tp_size=tp_size, pp_size=pp_size)
  out_dtype = np.dtype(jnp.dtype(dtype))
  tensors = hf.hf_tensors(model, out_dtype)

  def hf_tensor(name):  # fetched from the devices when a rank's file is written
    return tensors[name][1]().astype(out_dtype)

  with new_folder(path, overwrite=overwrite) as tmp:
    for rank in range(tp_size * pp_size):
      pp_rank, tp_rank = divmod(rank, tp_size)
      entries = _rank_entries(cfg, hf_tensor, tp_size, tp_rank, pp_size, pp_rank, out_dtype)
      write_file_lazy(tmp / f"rank{rank}.safetensors", entries, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
      tokenizer.save(tmp)
  return Path(path)


def build_engine(checkpoint, engine_dir, *, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 extra_args: tuple[str, ...] = (), trtllm_build: str = "trtllm-build") -> Path:
  """Run ``trtllm-build`` on a checkpoint folder: the engine's batch and length limits and the builder's
  own GEMM plugin choice; ``extra_args`` pass on anything else (refit, quantisation, plugins)."""
  executable = shutil.which(trtllm_build)
  if executable is None:
    raise RuntimeError(f"{trtllm_build}: not found on PATH; building an engine needs TensorRT-LLM installed "
                       "(from NVIDIA's package index, on a machine with a GPU)")
  checkpoint, engine_dir = Path(checkpoint), Path(engine_dir)
  if not (checkpoint / "config.json").is_file():
    raise FileNotFoundError(f"{checkpoint / 'config.json'}: not a TensorRT-LLM checkpoint folder")
  command = [executable, "--checkpoint_dir", str(checkpoint), "--output_dir", str(engine_dir),
             "--max_batch_size", str(max_batch_size), "--max_input_len", str(max_input_len),
             "--max_seq_len", str(max_seq_len), "--gemm_plugin", "auto", *extra_args]
  subprocess.run(command, check=True)
  return engine_dir
