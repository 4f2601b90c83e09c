"""Tiny random Hugging Face models saved by transformers: the independent reference for parity tests."""

import numpy as np
import torch
import transformers as tr

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make(kind: str):
  """(model class, config) for each architecture case the loader promises to handle."""
  if kind == "llama":  # GQA + Llama 3.1 frequency scaling
    return tr.LlamaForCausalLM, tr.LlamaConfig(**COMMON, rope_scaling=LLAMA3_SCALING, rope_theta=5e5)
  if kind == "llama_tied":
    return tr.LlamaForCausalLM, tr.LlamaConfig(**COMMON, tie_word_embeddings=True)
  if kind == "mistral":  # a window shorter than the test sequences
    return tr.MistralForCausalLM, tr.MistralConfig(**COMMON, sliding_window=8)
  if kind == "qwen2":
    return tr.Qwen2ForCausalLM, tr.Qwen2Config(**COMMON)
  raise KeyError(kind)


KINDS = ("llama", "llama_tied", "mistral", "qwen2")


def save_random(kind: str, path, seed: int = 0):
  cls, cfg = make(kind)
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  nonzero_attention_biases(model)
  model.save_pretrained(path)
  return model


def nonzero_attention_biases(model):
  """Draws the q/k/v biases a family has (Qwen2's), so that a dropped bias shows."""
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        if proj.bias is not None:
          proj.bias.normal_()


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())
