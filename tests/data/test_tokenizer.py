"""Tokenizers and chat rendering against transformers, and NeMo-Aligner's chat format by the letter."""

import json
from importlib import resources

import pytest
from transformers import PreTrainedTokenizerFast

from jalign.data.chat import (ChatTemplateError, NemoChatFormat, render_chat_template, steerlm_label)
from jalign.data.tokenizer import Tokenizer, TokenizerError

TINY_DIR = resources.files("jalign") / "assets" / "tiny_tokenizer"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


@pytest.fixture(scope="module")
def tiny():
  return Tokenizer.tiny()


@pytest.fixture(scope="module")
def reference():
  return PreTrainedTokenizerFast.from_pretrained(str(TINY_DIR))


def test_tiny_tokenizer_ids_match_the_tiny_preset(tiny):
  assert (tiny.vocab_size, tiny.pad_id, tiny.bos_id, tiny.eos_id) == (512, 0, 1, 2)


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "quality:4,toxicity:0", "\x11User\n\x12",
                                  "naïve café 🙂", "<|im_start|>assistant\nHi<|im_end|>"])
def test_encode_decode_match_transformers(tiny, reference, text):
  ids = tiny.encode(text)
  assert ids == reference.encode(text, add_special_tokens=False)
  assert tiny.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tiny, reference, add_generation_prompt):
  ours = tiny.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
  theirs = reference.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
  assert ours == theirs
  assert tiny.apply_chat_template(CHAT, tokenize=True) == tiny.encode(tiny.apply_chat_template(CHAT))


def test_save_and_reload(tiny, tmp_path):
  tiny.save(tmp_path)
  again = Tokenizer.from_dir(tmp_path)
  assert again.encode("Hello, world.") == tiny.encode("Hello, world.")
  assert again.chat_template == tiny.chat_template and again.eos_token == tiny.eos_token


def test_chat_template_jinja_file_wins(tiny, tmp_path):
  tiny.save(tmp_path)
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
  assert Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT[:2]) == "[system][user]"


def test_bad_tokenizer_folders_are_named(tiny, tmp_path):
  with pytest.raises(TokenizerError, match=r"tokenizer.json: not found"):
    Tokenizer.from_dir(tmp_path)
  tiny.save(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
    Tokenizer.from_dir(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
  with pytest.raises(TokenizerError, match=r"eos_token '<nope>' is not in the vocabulary"):
    Tokenizer.from_dir(tmp_path)


def test_template_errors_name_the_line_and_reach_the_caller():
  with pytest.raises(ChatTemplateError, match="line 2"):
    render_chat_template("ok\n{% for m in messages %}", CHAT)
  with pytest.raises(ChatTemplateError, match="only user turns"):
    render_chat_template("{{ raise_exception('only user turns') }}", CHAT)


def test_nemo_chat_format_renders_value_to_text_records():
  record = {"system": "You are helpful.", "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": "User", "value": "Hi", "label": None},
                              {"from": "Assistant", "value": "Hello!", "label": "quality:4,toxicity:0"}]}
  fmt = NemoChatFormat.extra_id()
  text = fmt.render_text(record)
  assert text == ("<extra_id_0>System\nYou are helpful.\n<extra_id_1>User\nHi\n"
                  "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\nHello!\n<extra_id_1>")
  trainable = "".join(s.text for s in fmt.render(record) if s.trainable)
  assert trainable == "Hello!\n<extra_id_1>"  # the reply and the next turn's start, not the label


def test_nemo_chat_format_defaults_and_generation_prompt():
  record = {"system": "", "conversations": [{"from": "User", "value": "2+2?"}]}
  text = NemoChatFormat().render_text(record, add_generation_prompt=True, generation_label="helpfulness:4")
  assert text == "\x00System\n\n\x11User\n2+2?\n\x11Assistant\n\x12helpfulness:4\n"
  with pytest.raises(ValueError, match="type"):
    NemoChatFormat().render(dict(record, type="SOMETHING"))


def test_steerlm_label_uses_the_fixed_attribute_order():
  assert steerlm_label({"verbosity": 2, "quality": 4, "toxicity": 0}) == "quality:4,toxicity:0,verbosity:2"
  with pytest.raises(ValueError, match="unknown SteerLM attributes"):
    steerlm_label({"charm": 3})
