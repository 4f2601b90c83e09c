"""jsonl formats: every record checked before training, errors as file:line: what is wrong."""

import json

import pytest

from jalign.data.formats import DataError, read_jsonl

GOOD = {
    "prompt_response": {"input": "2+2?", "output": "4"},
    "chat": {"system": "", "mask": "User", "conversations": [{"from": "User", "value": "Hi"},
                                                             {"from": "Assistant", "value": "Hello"}]},
    "comparison": {"prompt": [{"role": "user", "content": "Hi"}], "chosen_response": "Hello",
                   "rejected_response": "Go away", "chosen_reward": 2},
    "kto": {"prompt": "Hi", "response": "Hello", "preference": "chosen"},
    "prompt": {"text": "Tell me a joke."},
    "regression": {"text": "some chat", "label": [4, -100, 2.5]},
}


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
  return path


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_good_records_are_read(tmp_path, fmt):
  records, report = read_jsonl(_write(tmp_path, [GOOD[fmt], "", GOOD[fmt]]), fmt)
  assert len(records) == 2 and report.bad_lines == 0


def test_defaults_and_normalisation(tmp_path):
  rec = read_jsonl(_write(tmp_path, [GOOD["comparison"]]), "comparison")[0][0]
  assert (rec["chosen_reward"], rec["rejected_reward"]) == (2.0, 0.0)
  assert read_jsonl(_write(tmp_path, [GOOD["kto"]]), "kto")[0][0]["desirable"] is True


@pytest.mark.parametrize("fmt,line,message", [
    ("prompt_response", '{"input": "x"', r"data.jsonl:2: not JSON"),
    ("prompt_response", {"input": "x"}, r"data.jsonl:2: missing field 'output'"),
    ("prompt_response", {"input": 3, "output": "y"}, r"data.jsonl:2: field 'input' must be a string, got int"),
    ("prompt_response", {"input": "x", "output": "  "}, r"data.jsonl:2: field 'output' is empty"),
    ("prompt_response", "[1, 2]", r"data.jsonl:2: expected a JSON object, got list"),
    ("chat", {"conversations": [{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": ""}]},
     r"data.jsonl:2: conversations\[1\]: field 'value' is empty"),
    ("chat", {"conversations": [{"from": "User", "value": "Hi"}]}, r"data.jsonl:2: no turn outside mask"),
    ("comparison", {"prompt": "Hi", "chosen_response": "a"}, r"data.jsonl:2: missing field 'rejected_response'"),
    ("comparison", {"prompt": "Hi", "chosen_response": "a", "rejected_response": "b", "chosen_reward": "high"},
     r"data.jsonl:2: field 'chosen_reward' must be a number"),
    ("kto", {"prompt": "Hi", "response": "a", "preference": "maybe"}, r"data.jsonl:2: field 'preference'"),
    ("regression", {"text": "t", "label": []}, r"data.jsonl:2: field 'label' must be a non-empty list"),
])
def test_bad_lines_stop_with_file_and_line(tmp_path, fmt, line, message):
  path = _write(tmp_path, [GOOD[fmt], line, GOOD[fmt]])
  with pytest.raises(DataError, match=message):
    read_jsonl(path, fmt)
  records, report = read_jsonl(path, fmt, skip_bad_lines=True)
  assert len(records) == 2 and report.bad_lines == 1 and report.first_bad.startswith(f"{path}:2:")


def test_empty_or_missing_files(tmp_path):
  with pytest.raises(DataError, match="no usable records"):
    read_jsonl(_write(tmp_path, ['{"text": ""}']), "prompt", skip_bad_lines=True)
  with pytest.raises(DataError, match="nope.jsonl: file not found"):
    read_jsonl(tmp_path / "nope.jsonl", "prompt")


def test_bytes_that_are_not_utf8_are_a_bad_line_and_a_byte_order_mark_is_read(tmp_path):
  good = json.dumps(GOOD["prompt"]).encode()
  path = tmp_path / "data.jsonl"
  path.write_bytes(b"\n".join([good, good, b'{"text": "caf\xff\xfe"}', good]) + b"\n")
  with pytest.raises(DataError, match=r"data.jsonl:3: not UTF-8 text \(byte 0xff at column 14\)"):
    read_jsonl(path, "prompt")
  records, report = read_jsonl(path, "prompt", skip_bad_lines=True)
  assert len(records) == 3 and report.bad_lines == 1
  path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([good, good]) + b"\n")
  assert [r["text"] for r in read_jsonl(path, "prompt")[0]] == [GOOD["prompt"]["text"]] * 2
