"""Comparison, KTO, prompt and regression data: tokenization, masks, truncation and batches."""

import numpy as np
import pytest

from jalign.data.chat import ChatTemplateError, ModelChatTemplate, NemoChatFormat
from jalign.data.pipeline import batches
from jalign.data.preference import (encode_feedback, encode_pairs, feedback_row, kto_items, pairs_row,
                                    plan_item_rows, render_prompt)
from jalign.data.prompts import encode_prompts, encode_regression, prompt_row, regression_row
from jalign.data.tokenizer import Tokenizer

TOK = Tokenizer.tiny()
PAIR = {"prompt": "User: What is the capital of France?\nAssistant:", "chosen_response": " Paris.",
        "rejected_response": " The moon.", "chosen_reward": 1.0, "rejected_reward": 0.0}


def test_pairs_share_the_prompt_and_mask_only_responses():
  pairs, stats = encode_pairs([PAIR], TOK, max_length=64)
  p = pairs[0]
  n = int((~p.chosen.loss_mask).sum())
  np.testing.assert_array_equal(p.chosen.tokens[:n], p.rejected.tokens[:n])
  assert TOK.decode(p.chosen.tokens[p.chosen.loss_mask], skip_special_tokens=False) == " Paris.<|im_end|>"
  assert TOK.decode(p.rejected.tokens[p.rejected.loss_mask], skip_special_tokens=False) == " The moon.<|im_end|>"
  assert stats.examples == 1 and stats.dropped == 0


def test_message_prompts_render_in_the_nemo_chat_format():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  text, is_chat = render_prompt(messages, NemoChatFormat())
  assert is_chat and text == "\x00System\nBe brief.\n\x11User\nHi\n\x11Assistant\n"
  pairs, _ = encode_pairs([dict(PAIR, prompt=messages)], TOK, max_length=64)
  tail = TOK.decode(pairs[0].chosen.tokens[pairs[0].chosen.loss_mask], skip_special_tokens=False)
  assert tail == " Paris.\n\x11"


def test_message_prompts_in_the_models_own_chat_template():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  template = ModelChatTemplate(TOK)
  text, is_chat = render_prompt(messages, template)
  assert is_chat and text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  pairs, _ = encode_pairs([dict(PAIR, prompt=messages)], TOK, max_length=64, chat_format=template)
  chosen = pairs[0].chosen
  tail = TOK.decode(chosen.tokens[chosen.loss_mask], skip_special_tokens=False)
  assert tail == " Paris.<|im_end|>\n"
  # Prompt and reply tokenized apart give the whole conversation's tokens.
  whole = TOK.apply_chat_template(messages + [{"role": "assistant", "content": " Paris."}], tokenize=True)
  assert chosen.tokens.tolist() == whole
  with pytest.raises(ChatTemplateError, match="attribute labels"):
    render_prompt(messages, template, label="quality:4")


def test_long_prompts_lose_their_left_end_and_hopeless_pairs_are_dropped():
  long = dict(PAIR, prompt="word " * 50 + "Assistant:")
  pairs, stats = encode_pairs([long], TOK, max_length=20)
  assert stats.truncated == 1 and len(pairs[0].chosen) <= 20 and len(pairs[0].rejected) <= 20
  assert TOK.decode(pairs[0].chosen.tokens).rstrip().endswith("Assistant: Paris.")
  _, stats = encode_pairs([dict(PAIR, rejected_response=" no" * 40)], TOK, max_length=20)
  assert stats.dropped == 1 and stats.examples == 0


def test_pair_rows_unpacked_and_packed_and_feedback_batches():
  pairs, _ = encode_pairs([PAIR] * 6, TOK, max_length=32)
  one = lambda items, length, pad: pairs_row(items, length, pad, max_pairs=1)
  batch = next(batches([[i] for i in range(6)], pairs, length=64, pad_id=0, batch_size=4, seed=0, make_row=one))
  assert batch["tokens"].shape == (4, 64) and batch["pair_mask"].tolist() == [[1.0]] * 4
  assert batch["chosen_reward"].tolist() == [[1.0]] * 4 and batch["rejected_reward"].tolist() == [[0.0]] * 4
  n = len(pairs[0].chosen)
  assert set(batch["segment_ids"][0, :n]) == {1} and set(batch["segment_ids"][0, n:n + len(pairs[0].rejected)]) == {2}
  plan = plan_item_rows(pairs, 64, pack=True)
  per_pair = len(pairs[0].chosen) + len(pairs[0].rejected)
  assert [len(r) for r in plan] == [64 // per_pair] * (6 // (64 // per_pair)) + ([6 % (64 // per_pair)] if 6 % (64 // per_pair) else [])
  row = pairs_row([pairs[i] for i in plan[0]], 64, 0, max_pairs=4)
  assert row["pair_mask"].tolist() == [1.0] * len(plan[0]) + [0.0] * (4 - len(plan[0]))
  assert row["segment_ids"].max() == 2 * len(plan[0])
  with pytest.raises(ValueError, match="do not fit a row of at most 1"):
    pairs_row(pairs[:2], 64, 0, max_pairs=1)


def test_kto_items_pair_each_prompt_with_the_next_response():
  records = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "desirable": i % 2 == 0} for i in range(3)]
  fb, _ = encode_feedback(records, TOK, max_length=32)
  items = kto_items(fb, max_length=32)
  decode = lambda ex: TOK.decode(ex.tokens[ex.loss_mask])
  assert [decode(it.kl_example) for it in items] == [decode(fb[1].example), decode(fb[2].example),
                                                     decode(fb[0].example)]
  assert TOK.decode(items[0].kl_example.tokens).startswith("Question 0?")
  one = lambda its, length, pad: feedback_row(its, length, pad, max_items=2)
  batch = next(batches([[0, 1], [2]], items, length=64, pad_id=0, batch_size=2, seed=0, shuffle=False,
                       make_row=one))
  assert batch["desirable"].tolist() == [[1.0, 0.0], [1.0, 0.0]]
  assert batch["pair_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
  assert batch["segment_ids"][0].max() == 4 and batch["segment_ids"][1].max() == 2


def test_prompts_keep_their_end_and_regression_drops_what_does_not_fit():
  prompts, stats = encode_prompts([{"text": "one two three four five six seven"}], TOK, max_length=4)
  assert stats.truncated == 1 and len(prompts[0]) == 4
  assert TOK.decode(prompts[0]).endswith("seven")
  row = prompt_row(prompts[0], 8, pad_id=0)
  assert row["length"] == 4 and row["tokens"][4:].tolist() == [0] * 4
  items, stats = encode_regression([{"text": "short", "label": [4, -100]}, {"text": "long " * 40, "label": [1, 2]}],
                                   TOK, max_length=16, num_attributes=2)
  assert stats.examples == 1 and stats.dropped == 1
  row = regression_row(items[0], 16, pad_id=0)
  assert row["label"].tolist() == [4.0, -100.0] and row["length"] == len(items[0][0])
  with pytest.raises(ValueError, match="record 0: label has 2 attributes, expected 9"):
    encode_regression([{"text": "x", "label": [1, 2]}], TOK, max_length=16, num_attributes=9)
