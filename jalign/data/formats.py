"""NeMo-Aligner's jsonl formats: reading and checking records line by line.

Every record is checked when the file is read, before any training: a malformed line raises
``DataError("file:line: what is wrong")``, or with ``skip_bad_lines`` is skipped and counted.

| format            | fields |
|-------------------|--------|
| ``prompt_response`` | ``{"input": str, "output": str}`` |
| ``chat``            | ``{"system": str, "conversations": [{"from", "value", "label"?}], "mask": str, "type"?}`` |
| ``comparison``      | ``{"prompt": str or messages, "chosen_response": str, "rejected_response": str, "chosen_reward"?, "rejected_reward"?}`` |
| ``kto``             | ``{"prompt": str or messages, "response": str, "preference": "chosen"/"rejected" or bool}`` |
| ``prompt``          | ``{"text": str}`` (PPO, REINFORCE prompts) |
| ``regression``      | ``{"text": str, "label": [float, ...]}`` (SteerLM reward model) |
| ``problem``         | ``{"prompt" or "messages" or "problem": str or messages, "answer" or "expected_answer": str or number, ...}`` (GRPO) |
| ``steerlm2``        | ``{"system"?, "prompt_turns": [{"from", "value"}] (odd count, ending with the user), "label": str, "responses": [{"value", "log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))"}]}`` |
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path


class DataError(ValueError):
  """A data file that cannot be used; the message starts with ``file:line``."""


class _FieldError(ValueError):
  pass


def _str(obj, key, *, nonempty=False, optional=False, default=None):
  if key not in obj:
    if optional:
      return default
    raise _FieldError(f"missing field {key!r}")
  value = obj[key]
  if not isinstance(value, str):
    raise _FieldError(f"field {key!r} must be a string, got {type(value).__name__}")
  if nonempty and not value.strip():
    raise _FieldError(f"field {key!r} is empty")
  return value


def _number(obj, key, default):
  value = obj.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _FieldError(f"field {key!r} must be a number, got {type(value).__name__}")
  return float(value)


def _prompt(obj, key="prompt"):
  """A prompt string, or a list of OpenAI-style ``{"role", "content"}`` messages."""
  if key not in obj:
    raise _FieldError(f"missing field {key!r}")
  value = obj[key]
  if isinstance(value, str):
    if not value.strip():
      raise _FieldError(f"field {key!r} is empty")
    return value
  if isinstance(value, list) and value:
    for i, m in enumerate(value):
      if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
        raise _FieldError(f"{key}[{i}] must be a {{'role': str, 'content': str}} message")
    return value
  raise _FieldError(f"field {key!r} must be a string or a non-empty list of messages")


def parse_prompt_response(obj: dict) -> dict:
  return {"input": _str(obj, "input"), "output": _str(obj, "output", nonempty=True)}


def parse_chat(obj: dict) -> dict:
  turns = obj.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise _FieldError("field 'conversations' must be a non-empty list" if "conversations" in obj
                      else "missing field 'conversations'")
  mask = _str(obj, "mask", optional=True, default="User")
  masked = {s.strip() for s in mask.split(",")}
  out = []
  for i, t in enumerate(turns):
    if not isinstance(t, dict):
      raise _FieldError(f"conversations[{i}] must be an object")
    try:
      speaker = _str(t, "from", nonempty=True)
      value = _str(t, "value", nonempty=speaker not in masked)
    except _FieldError as e:
      raise _FieldError(f"conversations[{i}]: {e}") from None
    label = t.get("label")
    if label is not None and not isinstance(label, str):
      raise _FieldError(f"conversations[{i}]: field 'label' must be a string or null")
    out.append({"from": speaker, "value": value, "label": label})
  if all(t["from"] in masked for t in out):
    raise _FieldError(f"no turn outside mask {mask!r}: nothing to train on")
  kind = obj.get("type")
  if kind not in (None, "VALUE_TO_TEXT", "TEXT_TO_VALUE"):
    raise _FieldError(f"field 'type' must be VALUE_TO_TEXT or TEXT_TO_VALUE, got {kind!r}")
  return {"system": _str(obj, "system", optional=True, default=""), "conversations": out, "mask": mask,
          "type": kind}


def parse_comparison(obj: dict) -> dict:
  return {"prompt": _prompt(obj), "chosen_response": _str(obj, "chosen_response", nonempty=True),
          "rejected_response": _str(obj, "rejected_response", nonempty=True),
          "chosen_reward": _number(obj, "chosen_reward", 1.0),
          "rejected_reward": _number(obj, "rejected_reward", 0.0)}


def parse_kto(obj: dict) -> dict:
  pref = obj.get("preference")
  if pref in ("chosen", "desirable", True):
    desirable = True
  elif pref in ("rejected", "undesirable", False):
    desirable = False
  else:
    raise _FieldError(f"field 'preference' must be 'chosen' or 'rejected', got {pref!r}")
  return {"prompt": _prompt(obj), "response": _str(obj, "response", nonempty=True), "desirable": desirable}


def parse_prompt(obj: dict) -> dict:
  return {"text": _str(obj, "text", nonempty=True)}


def parse_problem(obj: dict) -> dict:
  """A prompt with its ground truth, for rewards that check answers (GRPO). The prompt is ``prompt``,
  ``messages`` or ``problem`` (NeMo-RL's name), the reference ``answer`` or ``expected_answer``; every
  field of the line rides along in ``record`` (``answer`` set) for the reward functions."""
  key = next((k for k in ("prompt", "messages", "problem") if k in obj), None)
  if key is None:
    raise _FieldError("missing field 'prompt' (or 'messages' or 'problem')")
  answer_key = next((k for k in ("answer", "expected_answer") if k in obj), None)
  if answer_key is None:
    raise _FieldError("missing field 'answer' (or 'expected_answer')")
  answer = obj[answer_key]
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
    raise _FieldError(f"field {answer_key!r} must be a non-empty string or a number")
  return {"prompt": _prompt(obj, key), "answer": str(answer), "record": {**obj, "answer": str(answer)}}


def parse_regression(obj: dict) -> dict:
  label = obj.get("label")
  if not isinstance(label, list) or not label or not all(
      isinstance(x, (int, float)) and not isinstance(x, bool) for x in label):
    raise _FieldError("field 'label' must be a non-empty list of numbers" if "label" in obj
                      else "missing field 'label'")
  return {"text": _str(obj, "text", nonempty=True), "label": [float(x) for x in label]}


STEERLM2_LOGS = ("log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))")


def parse_steerlm2(obj: dict) -> dict:
  """SteerLM 2.0 samples of one prompt: the prompt's turns, the attribute label the responses were
  sampled for, and each response with its three log-probabilities (NeMo-Aligner's field names)."""
  turns = obj.get("prompt_turns")
  if not isinstance(turns, list) or not turns:
    raise _FieldError("field 'prompt_turns' must be a non-empty list" if "prompt_turns" in obj
                      else "missing field 'prompt_turns'")
  if len(turns) % 2 == 0:
    raise _FieldError(f"'prompt_turns' has {len(turns)} turns; it must have an odd count, ending with the user's")
  out_turns = []
  for i, t in enumerate(turns):
    if not isinstance(t, dict):
      raise _FieldError(f"prompt_turns[{i}] must be an object")
    try:
      out_turns.append({"from": _str(t, "from", nonempty=True), "value": _str(t, "value")})
    except _FieldError as e:
      raise _FieldError(f"prompt_turns[{i}]: {e}") from None
  responses = obj.get("responses")
  if not isinstance(responses, list) or not responses:
    raise _FieldError("field 'responses' must be a non-empty list" if "responses" in obj
                      else "missing field 'responses'")
  out_responses = []
  for i, r in enumerate(responses):
    if not isinstance(r, dict):
      raise _FieldError(f"responses[{i}] must be an object")
    try:
      item = {"value": _str(r, "value", nonempty=True)}
      for key in STEERLM2_LOGS:
        value = r.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
          raise _FieldError(f"field {key!r} must be a finite number" if key in r else f"missing field {key!r}")
        item[key] = float(value)
    except _FieldError as e:
      raise _FieldError(f"responses[{i}]: {e}") from None
    out_responses.append(item)
  return {"system": _str(obj, "system", optional=True, default=""), "prompt_turns": out_turns,
          "label": _str(obj, "label"), "responses": out_responses}


PARSERS: dict[str, Callable[[dict], dict]] = {
    "prompt_response": parse_prompt_response, "chat": parse_chat, "comparison": parse_comparison,
    "kto": parse_kto, "prompt": parse_prompt, "regression": parse_regression, "steerlm2": parse_steerlm2,
    "problem": parse_problem,
}


@dataclasses.dataclass
class ReadReport:
  path: str
  records: int = 0
  bad_lines: int = 0
  first_bad: str | None = None
  lines: list = dataclasses.field(default_factory=list)  # the line number of each record


def read_jsonl(path: str | os.PathLike, fmt: str, *, skip_bad_lines: bool = False) -> tuple[list[dict], ReadReport]:
  """All records of a jsonl file in format ``fmt``, checked; blank lines (and a UTF-8 byte order mark)
  are ignored."""
  if fmt not in PARSERS:
    raise DataError(f"unknown data format {fmt!r}; known: {sorted(PARSERS)}")
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  parse = PARSERS[fmt]
  report = ReadReport(str(path))
  records = []
  with open(path, "rb") as f:  # decoded line by line, so that a bad byte is a bad line, not a bad file
    for lineno, raw in enumerate(f, 1):
      if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # as many tools write one
        raw = raw[len(codecs.BOM_UTF8):]
      if not raw.strip():
        continue
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise _FieldError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise _FieldError(f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
          raise _FieldError(f"expected a JSON object, got {type(obj).__name__}")
        records.append(parse(obj))
        report.lines.append(lineno)
      except _FieldError as e:
        where = f"{path}:{lineno}: {e}"
        if not skip_bad_lines:
          raise DataError(where) from None
        report.bad_lines += 1
        report.first_bad = report.first_bad or where
  report.records = len(records)
  if not records:
    raise DataError(f"{path}: no usable records" + (f" (first bad line: {report.first_bad})" if report.first_bad else ""))
  return records, report


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
  """Write ``records`` one per line through a temporary file, so a crash midway leaves no half file."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp.replace(path)
