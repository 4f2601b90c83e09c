"""GGUF files of Llama-architecture models: dequantized weights and the embedded tokenizer.

``load(path) -> (Transformer, Tokenizer)``. Tensors are dequantized one at a time with the ``gguf``
package and renamed to their Hugging Face names, so the rest of the loading (shape checks, layout
changes, placement on a mesh) is ``jalign.models.hf``'s. llama.cpp stores the q and k projections
with their rotary halves interleaved; they are put back in the half-split order here.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from jalign.data.tokenizer import Tokenizer
from jalign.models import hf
from jalign.models.llama import LlamaConfig, Transformer
from jalign.models.safetensors_io import CheckpointError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer splits by ``tokenizer.ggml.pre``, as llama.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "qwen2": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4


def _field(reader: gguf.GGUFReader, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's interleaving of the rotary halves in q/k rows."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Dequantized tensors kept for the next reads when loading onto a mesh, where every device's slice of a
# parameter is read from the whole tensor (of every layer), which would otherwise be dequantized once per
# device. Bounded, so that a large file never holds more than this beside what it loads.
DEQUANTIZED_CACHE_BYTES = 1 << 30


class GGUFTensors:
  """The tensors of a GGUF file under their Hugging Face names, dequantized on read (the most recently
  read kept for the next reads, up to ``cache_bytes``)."""

  def __init__(self, reader: gguf.GGUFReader, path: Path, cfg: LlamaConfig, *, cache_bytes: int = 0):
    self.path_ = path
    self.cfg = cfg
    self.cache_bytes = cache_bytes
    self._recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self.tensors = {}
    for t in reader.tensors:
      name = t.name
      if name in _GLOBAL_NAMES:
        self.tensors[_GLOBAL_NAMES[name]] = t
      elif name.startswith("blk."):
        _, layer, kind, _ = name.split(".", 3)
        if kind in _LAYER_NAMES:
          self.tensors[f"model.layers.{layer}.{_LAYER_NAMES[kind]}"] = t

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists dims innermost first

  def path(self, name: str) -> Path:
    return self.path_

  def get(self, name: str) -> np.ndarray:
    if name in self._recent:
      self._recent.move_to_end(name)
      return self._recent[name]
    t = self.tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(self.shape(name))
    if name.endswith("q_proj.weight"):
      w = _unpermute(w, self.cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      w = _unpermute(w, self.cfg.num_kv_heads)
    if self.cache_bytes:
      w.flags.writeable = False  # shared by every later read
      self._recent[name] = w
      while sum(x.nbytes for x in self._recent.values()) > self.cache_bytes and len(self._recent) > 1:
        self._recent.popitem(last=False)
    return w


def config_from_gguf(reader: gguf.GGUFReader, path: Path, **overrides) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise CheckpointError(f"{path}: per-frequency rope factors (rope_freqs.weight) are not supported; "
                          "load the Hugging Face checkpoint instead")
  scaling = _field(reader, "llama.rope.scaling.type")
  if scaling not in (None, "none"):
    raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported")

  def need(key):
    value = _field(reader, f"llama.{key}")
    if value is None:
      raise CheckpointError(f"{path}: missing GGUF key 'llama.{key}'")
    return value

  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
  if vocab is None:
    raise CheckpointError(f"{path}: neither llama.vocab_size nor a tokenizer vocabulary is present")
  fields = dict(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")), num_heads=heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
  fields.update(overrides)
  try:
    return LlamaConfig(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of the 256 byte values."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars = keep[:]
  n = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(keep, map(chr, chars)))


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: Path) -> Tokenizer:
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level 'gpt2')")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
  merges = _field(reader, "tokenizer.ggml.merges")
  if merges is None:
    raise CheckpointError(f"{path}: byte-level tokenizer without tokenizer.ggml.merges")
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, tok in enumerate(tokens):
    if not set(tok) <= alphabet:  # a token stored as plain text: spell its bytes
      tok = "".join(spelling[b] for b in tok.encode("utf-8"))
    vocab.setdefault(tok, i)
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                            ignore_merges=False))
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  splits = _PRE_SPLITS.get(pre)
  if splits is None:
    raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_SPLITS)}")
  backend.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, k in zip(tokens, types) if k == _USER_DEFINED])

  def token(key):
    i = _field(reader, key)
    return None if i is None else tokens[int(i)]

  return Tokenizer(backend, bos_token=token("tokenizer.ggml.bos_token_id"),
                   eos_token=token("tokenizer.ggml.eos_token_id"),
                   pad_token=token("tokenizer.ggml.padding_token_id"),
                   unk_token=token("tokenizer.ggml.unknown_token_id"),
                   chat_template=_field(reader, "tokenizer.chat_template"),
                   add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                   add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
                   source=str(path))


def open_reader(path: str | os.PathLike) -> tuple[gguf.GGUFReader, Path]:
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: file not found")
  try:
    return gguf.GGUFReader(path), path
  except Exception as e:  # the gguf package raises ValueError/struct errors on foreign files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def load(path, *, dtype="float32", mesh=None, compute_dtype=None, **config_overrides):
  """Load a GGUF Llama model and its tokenizer: ``(Transformer, Tokenizer)``."""
  reader, path = open_reader(path)
  cfg = config_from_gguf(reader, path, param_dtype=str(jnp.dtype(dtype)),
                         dtype=str(jnp.dtype(compute_dtype or dtype)), **config_overrides)
  tokenizer = tokenizer_from_gguf(reader, path)
  tensors = GGUFTensors(reader, path, cfg, cache_bytes=DEQUANTIZED_CACHE_BYTES if mesh is not None else 0)
  model: Transformer = hf.load_weights(tensors, cfg, mesh=mesh, source=path)
  return model, tokenizer
