"""SFT examples: records rendered and tokenized into ``tokens`` with an answer-only ``loss_mask``.

``loss_mask[i]`` is 1 where token i is a target the loss covers (the response, or the replies of
unmasked speakers); prompts, system text, speaker headers and SteerLM labels are 0.

Truncation (NeMo-Aligner's ``truncation_field: input``): a prompt-response example longer than
``max_length`` loses prompt tokens (from the right end with ``"right"``, the left with ``"left"``);
a chat example loses its tail. Examples left with no target token are dropped. Both are counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jalign.data.chat import NemoChatFormat
from jalign.data.tokenizer import Tokenizer


@dataclasses.dataclass
class EncodeStats:
  examples: int = 0
  truncated: int = 0
  dropped: int = 0
  tokens: int = 0
  loss_tokens: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def keep(self, *examples: "Example", truncated: bool) -> None:
    """Count one record kept, made of ``examples`` (one, or a chosen/rejected pair)."""
    self.examples += 1
    self.truncated += bool(truncated)
    self.tokens += sum(len(ex) for ex in examples)
    self.loss_tokens += sum(int(ex.loss_mask[1:].sum()) for ex in examples)


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray     # int32 [L]
  loss_mask: np.ndarray  # bool [L]

  def __len__(self) -> int:
    return len(self.tokens)


def _example(pieces: list[tuple[list[int], bool]]) -> Example:
  tokens = [t for ids, _ in pieces for t in ids]
  mask = [m for ids, m in pieces for _ in ids]
  return Example(np.asarray(tokens, np.int32), np.asarray(mask, bool))


def encode_prompt_response(record: dict, tok: Tokenizer, *, max_length: int, template: str = "{input} {output}",
                           truncation: str = "right", add_bos: bool = False, add_eos: bool = True):
  """``(Example or None, truncated)``; the prompt is the template up to ``{output}``."""
  if "{output}" not in template or "{input}" not in template:
    raise ValueError(f"prompt template {template!r} must contain {{input}} and {{output}}")
  before, after = template.split("{output}", 1)
  prompt = tok.encode(before.format(input=record["input"]), add_special_tokens=False)
  response = tok.encode(record["output"] + after.format(input=record["input"]), add_special_tokens=False)
  if add_bos and tok.bos_id is not None:
    prompt = [tok.bos_id] + prompt
  if add_eos and tok.eos_id is not None:
    response = response + [tok.eos_id]
  truncated = False
  if len(prompt) + len(response) > max_length:
    keep = max_length - len(response)
    if keep < 1:
      return None, True
    prompt = prompt[:keep] if truncation == "right" else prompt[len(prompt) - keep:]
    truncated = True
  return _example([(prompt, False), (response, True)]), truncated


def encode_chat(record: dict, tok: Tokenizer, *, max_length: int, chat_format: NemoChatFormat):
  """``(Example or None, truncated)`` for a NeMo chat record, each segment tokenized on its own."""
  pieces = [(tok.encode(s.text, add_special_tokens=False), s.trainable) for s in chat_format.render(record)]
  example = _example(pieces)
  truncated = len(example) > max_length
  if truncated:
    example = Example(example.tokens[:max_length], example.loss_mask[:max_length])
  if not example.loss_mask[1:].any():  # the first token is never a target
    return None, truncated
  return example, truncated


def encode_records(records: list[dict], fmt: str, tok: Tokenizer, *, max_length: int, template="{input} {output}",
                   truncation="right", add_bos=False, add_eos=True,
                   chat_format: NemoChatFormat | None = None) -> tuple[list[Example], EncodeStats]:
  if truncation not in ("right", "left"):
    raise ValueError(f"truncation must be 'right' or 'left', got {truncation!r}")
  stats = EncodeStats()
  out = []
  for rec in records:
    if fmt == "prompt_response":
      ex, cut = encode_prompt_response(rec, tok, max_length=max_length, template=template,
                                       truncation=truncation, add_bos=add_bos, add_eos=add_eos)
    elif fmt == "chat":
      ex, cut = encode_chat(rec, tok, max_length=max_length, chat_format=chat_format or NemoChatFormat())
    else:
      raise ValueError(f"SFT reads 'prompt_response' or 'chat' data, not {fmt!r}")
    if ex is None:
      stats.dropped += 1
      continue
    stats.keep(ex, truncated=cut)
    out.append(ex)
  return out, stats
