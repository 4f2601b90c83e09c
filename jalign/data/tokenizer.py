"""Tokenizers: a Hugging Face ``tokenizer.json`` run by ``tokenizers``, with its special tokens and chat template.

``Tokenizer.from_dir(path)`` reads ``tokenizer.json`` and, when present, ``tokenizer_config.json``
(special tokens, ``add_bos_token``, ``chat_template``), ``special_tokens_map.json`` and
``chat_template.jinja``. ``Tokenizer.tiny()`` is the small tokenizer shipped with the package for the
tiny embedded configs.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import tokenizers

from jalign.data.chat import render_chat_template


class TokenizerError(ValueError):
  pass


def _token_text(value):
  """Special tokens appear as strings or as ``{"content": ...}`` dicts in tokenizer_config.json."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None,
               unk_token: str | None = None, chat_template: str | None = None,
               add_bos_token: bool = False, add_eos_token: bool = False, source: str = "<memory>"):
    self.backend = backend
    self.source = source
    self.chat_template = chat_template
    self.add_bos_token = add_bos_token
    self.add_eos_token = add_eos_token
    self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
      token = getattr(self, name)
      if token is not None and backend.token_to_id(token) is None:
        raise TokenizerError(f"{source}: {name} {token!r} is not in the vocabulary")

  # -- loading and saving ---------------------------------------------------------------------

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
      raise TokenizerError(f"{tok_file}: not found (only tokenizer.json tokenizers are supported)")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise TokenizerError(f"{tok_file}: cannot be read ({e})") from None
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      f = path / name
      if f.is_file():
        try:
          config.update(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
          raise TokenizerError(f"{f}: not valid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
      template = jinja.read_text()
    return cls(backend, bos_token=_token_text(config.get("bos_token")),
               eos_token=_token_text(config.get("eos_token")),
               pad_token=_token_text(config.get("pad_token")),
               unk_token=_token_text(config.get("unk_token")), chat_template=template,
               add_bos_token=bool(config.get("add_bos_token", False)),
               add_eos_token=bool(config.get("add_eos_token", False)), source=str(path))

  @classmethod
  def tiny(cls) -> "Tokenizer":
    """The 512-token byte-level BPE tokenizer shipped in ``jalign/assets/tiny_tokenizer``."""
    return cls.from_dir(resources.files("jalign") / "assets" / "tiny_tokenizer")

  def save(self, path: str | os.PathLike) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
              "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
              "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

  # -- ids ------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(i)

  def _id(self, token):
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def pad_id(self) -> int | None:
    pad = self._id(self.pad_token)
    return pad if pad is not None else self.eos_id

  # -- text -----------------------------------------------------------------------------------

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; special tokens written in the text map to their ids.

    With ``add_special_tokens``, BOS/EOS are added when the tokenizer's config asks for them.
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if add_special_tokens:
      if self.add_bos_token and self.bos_id is not None:
        ids = [self.bos_id] + ids
      if self.add_eos_token and self.eos_id is not None:
        ids = ids + [self.eos_id]
    return ids

  def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                          tokenize: bool = False, **variables):
    """Render (and with ``tokenize`` encode) a conversation with this tokenizer's chat template."""
    if self.chat_template is None:
      raise TokenizerError(f"{self.source}: this tokenizer has no chat template")
    text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                **variables)
    return self.encode(text, add_special_tokens=False) if tokenize else text
