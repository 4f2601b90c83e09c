"""SFT encoding (answer-only masks, truncation), packing and the batch pipeline."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.losses import sft
from jalign.data.chat import NemoChatFormat
from jalign.data.packing import build_row, first_fit, plan_rows
from jalign.data.pipeline import batches
from jalign.data.sft import encode_prompt_response, encode_records
from jalign.data.tokenizer import Tokenizer
from jalign.models import LlamaConfig, Transformer

TOK = Tokenizer.tiny()
CHAT = {"system": "Be brief.", "mask": "User", "type": None,
        "conversations": [{"from": "User", "value": "What is the capital of France?", "label": None},
                          {"from": "Assistant", "value": "Paris.", "label": None}]}


def test_prompt_response_masks_only_the_answer():
  ex, cut = encode_prompt_response({"input": "2+2?", "output": "four"}, TOK, max_length=64)
  assert not cut
  target_text = TOK.decode(ex.tokens[ex.loss_mask], skip_special_tokens=False)
  assert target_text == "four<|im_end|>"  # the response and EOS; the template's space ends the prompt
  assert TOK.decode(ex.tokens[~ex.loss_mask]) == "2+2? "


@pytest.mark.parametrize("truncation", ["right", "left"])
def test_prompt_truncation_keeps_the_response(truncation):
  rec = {"input": "one two three four five", "output": "six"}
  full, _ = encode_prompt_response(rec, TOK, max_length=64)
  prompt, response_len = full.tokens[~full.loss_mask], int(full.loss_mask.sum())
  ex, cut = encode_prompt_response(rec, TOK, max_length=response_len + 3, truncation=truncation)
  kept = prompt[:3] if truncation == "right" else prompt[-3:]
  assert cut and len(ex) == response_len + 3
  np.testing.assert_array_equal(ex.tokens[~ex.loss_mask], kept)
  np.testing.assert_array_equal(ex.tokens[ex.loss_mask], full.tokens[full.loss_mask])
  none, cut = encode_prompt_response(rec, TOK, max_length=response_len)
  assert none is None and cut


def test_chat_encoding_counts_truncated_and_dropped():
  examples, stats = encode_records([CHAT, CHAT], "chat", TOK, max_length=64)
  ex = examples[0]
  assert TOK.decode(ex.tokens[ex.loss_mask], skip_special_tokens=False) == "Paris.\n\x11"
  _, stats = encode_records([CHAT], "chat", TOK, max_length=len(ex) - 2)
  assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 0)
  _, stats = encode_records([CHAT], "chat", TOK, max_length=8)  # only the system prompt fits
  assert (stats.examples, stats.dropped) == (0, 1)
  examples, _ = encode_records([CHAT], "chat", TOK, max_length=64, chat_format=NemoChatFormat.extra_id())
  assert TOK.token_to_id("<extra_id_1>") in examples[0].tokens.tolist()


def test_first_fit_packing():
  bins = first_fit([5, 4, 3, 6, 2, 1], 8)
  assert bins == [[0, 2], [1, 4, 5], [3]]
  with pytest.raises(ValueError, match="more than the row length"):
    first_fit([9], 8)


def test_rows_shift_targets_and_never_predict_across_documents():
  examples, _ = encode_records([CHAT, CHAT], "chat", TOK, max_length=64)
  n = len(examples[0])
  row = build_row(examples, 2 * n + 5, pad_id=0)
  assert row["segment_ids"].tolist() == [1] * n + [2] * n + [0] * 5
  assert row["positions"][n] == 0 and row["positions"][n - 1] == n - 1
  assert row["loss_mask"][n - 1] == 0 and row["loss_mask"][2 * n - 1] == 0 and row["loss_mask"][2 * n:].sum() == 0
  np.testing.assert_array_equal(row["targets"][:n - 1], examples[0].tokens[1:])


def test_packing_gives_the_same_per_document_loss_as_unpacked_rows():
  records = [dict(CHAT, conversations=[CHAT["conversations"][0],
                                       {"from": "Assistant", "value": v, "label": None}])
             for v in ("Paris.", "It is Paris, of course.", "Paris, the city of light.")]
  examples, _ = encode_records(records, "chat", TOK, max_length=64)
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  length = 96
  packed_rows = plan_rows(examples, length, pack=True)
  assert len(packed_rows) < len(examples)
  packed = {k: jnp.stack([build_row([examples[i] for i in r], length, 0)[k] for r in packed_rows])
            for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
  nll_packed = np.asarray(sft.token_nll(model, packed) * packed["loss_mask"])
  for doc, ex in enumerate(examples):
    single = {k: v[None] for k, v in build_row([ex], length, 0).items()}
    alone = float(jnp.sum(sft.token_nll(model, single) * single["loss_mask"]))
    r = next(i for i, row in enumerate(packed_rows) if doc in row)
    seg = packed_rows[r].index(doc) + 1
    in_pack = float(nll_packed[r][np.asarray(packed["segment_ids"][r]) == seg].sum())
    assert abs(in_pack - alone) < 1e-4 * max(1.0, abs(alone))


def test_pipeline_resumes_with_the_exact_next_batch_and_shards_by_process():
  examples, _ = encode_records([CHAT] * 40, "chat", TOK, max_length=64)
  rows = plan_rows(examples, 64, pack=False)
  it = batches(rows, examples, length=64, pad_id=0, batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(4)]
  again = batches(rows, examples, length=64, pad_id=0, batch_size=4, seed=3)
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again)["tokens"], e)
  # Two processes build disjoint halves of the same global batches.
  from jalign.data.pipeline import row_dataset
  examples = [type(ex)(ex.tokens + i, ex.loss_mask)
              for i, ex in enumerate(examples)]  # make every row distinct
  whole = list(row_dataset(rows, examples, length=64, pad_id=0, batch_size=4, seed=7, num_epochs=1,
                           process_index=0, process_count=1))
  halves = [list(row_dataset(rows, examples, length=64, pad_id=0, batch_size=4, seed=7, num_epochs=1,
                             process_index=p, process_count=2)) for p in (0, 1)]
  assert len(whole) == len(halves[0]) == 10
  for w, a, b in zip(whole, *halves):
    assert a["tokens"].shape == (2, 64)
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), w["tokens"])


def test_padding_to_a_multiple_cuts_unused_columns():
  examples, _ = encode_records([CHAT] * 8, "chat", TOK, max_length=64)
  rows = plan_rows(examples, 64, pack=False)
  batch = next(batches(rows, examples, length=64, pad_id=0, batch_size=4, seed=0, pad_to_multiple_of=16))
  n = len(examples[0])
  assert batch["tokens"].shape == (4, -(-n // 16) * 16) and batch["segment_ids"][:, :n].all()
