"""Hugging Face reward model folders in and out: LlamaForSequenceClassification (and its Mistral and Qwen2
twins), how public reward models such as Skywork-Reward-Llama-3.1-8B ship.

Such a folder holds the language model's trunk under ``model.*`` and ``score.weight`` ``[num_labels,
hidden]``, a linear layer without bias that transformers reads at each row's last token. ``load(path)``
reads it as a ``ValueModel``: the trunk as ``jalign.models.hf.load`` reads a language model's (with a
mesh, every device reads only its own slice, straight into its sharding), the head's kernel
``score.weight`` transposed and its bias zero. ``save(model, path)`` writes a ``ValueModel`` back as
``transformers`` loads it with the same scores; a head with a nonzero bias (a regression reward model's)
is refused, as the format has no place for it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.models import hf
from jalign.models.heads import ValueModel
from jalign.models.llama import LlamaConfig
from jalign.models.safetensors_io import CheckpointError, SafetensorsReader

# Each sequence classification class, and the language model class whose trunk it shares.
ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}
VALUE_CLASS = {hf.ARCHITECTURES[causal]: value for value, causal in ARCHITECTURES.items()}  # by family
SCORE = "score.weight"


def num_labels(config: dict) -> int:
  """The outputs of the score layer, as transformers counts them (``num_labels``, else its labels, else
  its default of 2)."""
  return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)


def config_from_hf(config: dict, source: Path | str = "config.json", **overrides) -> tuple[LlamaConfig, int]:
  """``(trunk config, outputs)`` of a sequence classification model's ``config.json`` dict."""
  archs = config.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    raise CheckpointError(f"{source}: architectures {archs} name no reward model; supported: "
                          f"{sorted(ARCHITECTURES)}")
  cfg = hf.config_from_hf({**config, "architectures": [ARCHITECTURES[arch]]}, source, **overrides)
  return cfg, num_labels(config)


def read_config(path, **overrides) -> tuple[LlamaConfig, int]:
  """``(trunk config, outputs)`` of a reward model folder, read without its weights."""
  path = Path(path)
  return config_from_hf(hf.read_config_file(path), path / "config.json", **overrides)


def tensor_maps(cfg: LlamaConfig, outputs: int) -> list[hf.TensorMap]:
  """The language model's maps under ``backbone``, and the score layer as the head's kernel."""
  trunk = [dataclasses.replace(m, ours=("backbone",) + m.ours) for m in hf.tensor_maps(cfg, with_lm_head=False)]
  transpose = lambda w, c: w.T
  return trunk + [hf.TensorMap(("head", "kernel"), SCORE, lambda c: (outputs, c.hidden_size), transpose, transpose)]


def load_weights(reader: SafetensorsReader, cfg: LlamaConfig, outputs: int, *, mesh=None,
                 source: Path | str = "") -> ValueModel:
  abstract = nnx.eval_shape(lambda: ValueModel(cfg, outputs, rngs=nnx.Rngs(0)))
  return hf.read_module(reader, abstract, tensor_maps(cfg, outputs), cfg, mesh=mesh, source=source,
                        zeros=(("head", "bias"),))


def load(path, *, dtype="float32", mesh=None, compute_dtype=None, **config_overrides) -> ValueModel:
  """Load a Hugging Face sequence classification folder as a ``ValueModel``.

  ``dtype`` is the trunk's parameter dtype (the head stays float32); the compute dtype defaults to it.
  With ``mesh``, parameters are placed by the logical-axis rules active at the call.
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a folder")
  cfg, outputs = read_config(path, param_dtype=str(jnp.dtype(dtype)),
                             dtype=str(jnp.dtype(compute_dtype or dtype)), **config_overrides)
  return load_weights(SafetensorsReader(hf.weight_files(path)), cfg, outputs, mesh=mesh, source=path)


def config_to_hf(cfg: LlamaConfig, outputs: int, dtype: str, pad_token_id=None) -> dict:
  out = hf.config_to_hf(cfg, dtype)
  labels = {i: f"LABEL_{i}" for i in range(outputs)}
  # transformers picks each row's score at its last token that is not pad_token_id, and without one
  # scores a single row at a time.
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else pad_token_id
  out.update(architectures=[VALUE_CLASS[cfg.architecture]], id2label={str(i): v for i, v in labels.items()},
             label2id={v: i for i, v in labels.items()}, pad_token_id=pad)
  return out


def save(model: ValueModel, path, *, dtype=None, max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
         tokenizer=None, overwrite: bool = False) -> Path:
  """Write ``model`` as a Hugging Face sequence classification folder; ``dtype`` defaults to the trunk's
  parameter dtype, ``tokenizer`` is saved alongside (and gives the pad token when the model config has
  none). The folder appears only once complete."""
  bias = np.asarray(jax.device_get(model.head.bias[...]))
  if np.any(bias != 0):
    raise ValueError(f"{path}: the value head has a nonzero bias {bias.tolist()}, which a Hugging Face "
                     f"{VALUE_CLASS[model.config.architecture]} (score layer without bias) cannot hold")
  cfg = model.config
  out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  kernel = model.head.kernel[...]
  outputs = kernel.shape[-1]
  tensors = hf.hf_tensors(model.backbone, out_dtype)
  tensors[SCORE] = ((outputs, cfg.hidden_size), lambda: np.asarray(jax.device_get(kernel), np.float32).T)
  pad = tokenizer.pad_id if tokenizer is not None else None
  return hf.write_folder(path, tensors, out_dtype, {"config.json": config_to_hf(cfg, outputs, str(out_dtype), pad)},
                         max_shard_bytes=max_shard_bytes, tokenizer=tokenizer, overwrite=overwrite)
