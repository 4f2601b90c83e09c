"""Math final answers: finding the one a response gives, and deciding whether it equals the reference.

A response's answer is, in order of preference, the inside of its last ``<answer>...</answer>``, its
last ``\\boxed{...}`` (braces balanced), what follows its last "the answer is" / "answer:" / ``####``
(GSM8K's marker) up to the end of that line or sentence, or else its last number. Two answers are equal
when both read as numbers with the same exact value (integers, decimals, thousands separators,
fractions ``a/b`` and ``\\frac{a}{b}``, a sign, a trailing percent sign or unit-free LaTeX such as
``\\left(``, ``\\!`` or ``$``), or otherwise when their normalised texts are equal.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_MARKERS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:|####)\s*:?\s*", re.IGNORECASE)
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _last_braced(text: str, command: str) -> str | None:
  """The inside of the last ``\\command{...}`` of ``text``, braces balanced."""
  start = text.rfind("\\" + command + "{")
  if start < 0:
    return None
  i = start + len(command) + 2
  depth, begin = 1, i
  while i < len(text):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[begin:i]
    i += 1
  return None


def extract_answer(response: str) -> str | None:
  """The final answer ``response`` gives (see the module docstring), or None when it gives none."""
  tagged = _TAG.findall(response)
  if tagged:
    inner = tagged[-1]
    return _last_braced(inner, "boxed") or inner.strip() or None
  for command in ("boxed", "fbox"):
    boxed = _last_braced(response, command)
    if boxed is not None:
      return boxed.strip()
  marked = list(_MARKERS.finditer(response))
  if marked:
    rest = response[marked[-1].end():]
    line = re.split(r"\n|(?<=[^\d])\.(?:\s|$)", rest, maxsplit=1)[0].strip()
    if line:
      return line
  numbers = re.findall(_NUMBER, response)
  return numbers[-1] if numbers else None


def _unbraced(text: str) -> str:
  """``text`` without braces that enclose all of it (``{{1}}`` is 1)."""
  while text.startswith("{") and text.endswith("}"):
    depth = 0
    for i, ch in enumerate(text):
      depth += {"{": 1, "}": -1}.get(ch, 0)
      if depth == 0 and i < len(text) - 1:
        return text  # the first brace closes early: {a}{b}
    text = text[1:-1].strip()
  return text


def _strip_latex(text: str) -> str:
  text = _unbraced(text.strip().strip("$").strip())
  text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
  text = re.sub(r"\\(?:left|right|!|,|;|:|quad)", "", text)
  text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
  text = re.sub(r"\\[dt]?frac(\d)(\d)", r"\1/\2", text)
  text = text.replace("^\\circ", "").replace("\\%", "%")
  return text.strip().rstrip(".").strip()


def as_number(text: str) -> Fraction | None:
  """The exact value of ``text`` when it reads as a number (see the module docstring), else None."""
  t = _strip_latex(text).replace(" ", "")
  if t.endswith("%"):
    t = t[:-1]
  t = re.sub(r"^\((-?[\d.,]+)\)$", r"\1", t)
  t = re.sub(r"^\((-?[\d.]+)\)/\((\d+)\)$", r"\1/\2", t)  # what \frac{a}{b} became
  t = re.sub(r"^-\((\d+)\)/\((\d+)\)$", r"-\1/\2", t)
  if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
    t = t.replace(",", "")
  if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", t):
    return None
  try:
    return Fraction(t)
  except (ValueError, ZeroDivisionError):
    return None


def normalise(text: str) -> str:
  """``text`` without LaTeX dressing, spaces and case, for answers that are not numbers."""
  return re.sub(r"\s+", "", _strip_latex(text)).lower()


def equivalent(answer: str | None, reference) -> bool:
  """Whether ``answer`` states ``reference`` (a string or a number)."""
  if answer is None:
    return False
  reference = str(reference)
  a, b = as_number(answer), as_number(reference)
  if a is not None and b is not None:
    return a == b
  return normalise(answer) == normalise(reference)


def final_answer(prompt: str, response: str, record: dict) -> float:
  """Reward function: 1.0 when the response's final answer equals ``record["answer"]``, else 0.0."""
  del prompt
  return 1.0 if equivalent(extract_answer(response), record["answer"]) else 0.0
