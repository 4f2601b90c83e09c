"""Chat rendering: Hugging Face jinja2 chat templates, and NeMo-Aligner's own chat format.

``render_chat_template`` renders the ``chat_template`` of a tokenizer the way ``transformers``
does (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``).

``NemoChatFormat`` renders NeMo-Aligner chat records
``{"system": str, "conversations": [{"from": "User"|"Assistant", "value": str, "label": str|None}],
"mask": "User", "type": "VALUE_TO_TEXT"}`` as
``<sys>System\\n{system}\\n<turn>User\\n{msg}\\n<turn>Assistant\\n<label>{label}\\n{msg}\\n<turn>``,
returning the text as segments marked trainable or not, so that the loss can cover only the
unmasked speakers' replies.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ----------------------------------------------------------------------------------------------
# Hugging Face chat templates
# ----------------------------------------------------------------------------------------------


class ChatTemplateError(ValueError):
  pass


def _raise_exception(message):
  raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         **variables) -> str:
  """Render ``messages`` (``[{"role", "content"}]``) with a jinja2 chat template."""
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m:
      raise ChatTemplateError(f"message {i} must be a dict with a 'role'; got {m!r}")
  return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **variables)


# ----------------------------------------------------------------------------------------------
# NeMo-Aligner chat format
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
  text: str
  trainable: bool  # part of a reply the loss should cover
  role: str


@dataclasses.dataclass(frozen=True)
class NemoChatFormat:
  """NeMo-Aligner's ``chat_prompt_tokens``; defaults are those of its ``gpt_sft.yaml``."""
  system_turn_start: str = "\x00"
  turn_start: str = "\x11"
  label_start: str = "\x12"
  end_of_turn: str = "\n"
  end_of_name: str = "\n"

  @classmethod
  def extra_id(cls) -> "NemoChatFormat":
    """The ``<extra_id_N>`` tokens of the SteerLM and SPIN recipes."""
    return cls("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "\n", "\n")

  def render(self, record: dict, *, add_generation_prompt: bool = False,
             generation_label: str | None = None) -> list[Segment]:
    """Segments of one chat record. Speakers named in ``record["mask"]`` are not trainable.

    With ``add_generation_prompt``, a final ``<turn>Assistant\\n`` (and ``<label>{label}\\n`` when
    ``generation_label`` is given) is appended for the model to continue.
    """
    if "conversations" not in record:
      raise ValueError("a NeMo chat record needs a 'conversations' list")
    masked = {s.strip() for s in str(record.get("mask", "User")).split(",")}
    kind = record.get("type")
    if kind not in (None, "VALUE_TO_TEXT", "TEXT_TO_VALUE"):
      raise ValueError(f"unknown chat record type {kind!r} (VALUE_TO_TEXT, TEXT_TO_VALUE or none)")
    segments = [Segment(f"{self.system_turn_start}System{self.end_of_name}{record.get('system', '')}"
                        f"{self.end_of_turn}", False, "System")]
    turns = record["conversations"]
    for i, turn in enumerate(turns):
      speaker, value, label = turn["from"], turn["value"], turn.get("label")
      trainable = speaker not in masked
      header = f"{self.turn_start}{speaker}{self.end_of_name}"
      label_text = "" if label is None else f"{self.label_start}{label}{self.end_of_name}"
      if kind == "TEXT_TO_VALUE":
        segments.append(Segment(header, False, speaker))
        segments.append(Segment(f"{value}{self.end_of_turn}{label_text}", trainable, speaker))
      else:
        segments.append(Segment(header + (label_text if kind == "VALUE_TO_TEXT" else ""), False, speaker))
        segments.append(Segment(f"{value}{self.end_of_turn}", trainable, speaker))
      if i == len(turns) - 1 and trainable and not add_generation_prompt:
        # The next turn's start token ends the reply: the model learns to stop there.
        segments.append(Segment(self.turn_start, True, speaker))
    if add_generation_prompt:
      label_text = "" if generation_label is None else f"{self.label_start}{generation_label}{self.end_of_name}"
      segments.append(Segment(f"{self.turn_start}Assistant{self.end_of_name}{label_text}", False, "Assistant"))
    return segments

  def render_text(self, record: dict, **kwargs) -> str:
    return "".join(s.text for s in self.render(record, **kwargs))


STEERLM_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness",
                      "coherence", "complexity", "verbosity")


def steerlm_label(values: dict[str, int | float]) -> str:
  """The SteerLM label string, attributes in NeMo-Aligner's fixed order: ``quality:4,toxicity:0,...``."""
  unknown = set(values) - set(STEERLM_ATTRIBUTES)
  if unknown:
    raise ValueError(f"unknown SteerLM attributes {sorted(unknown)}; known: {STEERLM_ATTRIBUTES}")
  return ",".join(f"{k}:{_fmt(values[k])}" for k in STEERLM_ATTRIBUTES if k in values)


def _fmt(v):
  return str(int(v)) if float(v).is_integer() else str(v)


@dataclasses.dataclass(frozen=True)
class ModelChatTemplate:
  """A tokenizer's own jinja chat template for message prompts (``config.data.chat_template = "model"``).

  The prompt is the messages rendered with the generation prompt; a reply is what rendering the
  messages plus the assistant's reply adds after that (its end-of-turn tokens included), so the prompt
  is always a prefix of the whole conversation, as with NeMo's format.
  """
  tokenizer: object

  def prompt_text(self, messages: list[dict], label: str | None = None) -> str:
    if label is not None:
      raise ChatTemplateError("attribute labels (SteerLM) need NeMo's chat format, not the model's template")
    return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

  def reply_text(self, messages: list[dict], reply: str) -> str:
    prompt = self.prompt_text(messages)
    full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}])
    if not full.startswith(prompt):
      raise ChatTemplateError("the chat template renders a conversation that does not start with its own "
                              "generation prompt; use data.chat_template = 'nemo'")
    return full[len(prompt):]


def stop_ids(chat, tok) -> tuple[int, ...]:
  """The token ids that end a sampled reply: the tokenizer's EOS, and the token that closes a turn of
  the chat format (NeMo's next turn start, a template's end of turn) when it is a single token."""
  if isinstance(chat, ModelChatTemplate):
    tail = chat.reply_text([{"role": "user", "content": "?"}], "x")
    ids = tok.encode(tail[tail.index("x") + 1:], add_special_tokens=False)[:1]
  else:
    ids = tok.encode(chat.turn_start, add_special_tokens=False)
    ids = ids if len(ids) == 1 else []
  return tuple(dict.fromkeys(i for i in (tok.eos_id, *ids) if i is not None))


def without_stop(response: list[int], stops) -> list[int]:
  """A sampled reply without the stop token that ended it (``stop_ids``), as a reward function reads it."""
  return response[:-1] if response and response[-1] in stops else response
