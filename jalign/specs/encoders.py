"""Encoders and row plans that several algorithms share: SFT records, comparison pairs, slotted rows."""

from __future__ import annotations

from jalign.data import packing, preference
from jalign.data.sft import encode_records
from jalign.specs.base import message_format


def sft_records(c, tok, records, path):
  """Chat or prompt/response records as SFT examples (the loss on the responses)."""
  d = c.data
  return encode_records(records, d.format, tok, max_length=d.max_seq_length, template=d.prompt_template,
                        truncation=d.truncation, add_bos=d.add_bos, add_eos=d.add_eos, chat_format=message_format(c))


def comparison_pairs(c, tok, records, path):
  """Comparison records as (chosen, rejected) pairs."""
  d = c.data
  return preference.encode_pairs(records, tok, max_length=d.max_seq_length, chat_format=message_format(c, tok),
                                 add_eos=d.add_eos, over_length=d.over_length)


def packed_rows(c, examples):
  """Examples packed into rows of ``data.max_seq_length`` (one a row with ``data.pack`` off)."""
  return packing.plan_rows(examples, c.data.max_seq_length, pack=c.data.pack)


def one_per_row(c, items):
  return [[i] for i in range(len(items))]


def slotted_rows(c, items, size=len):
  """Items of two sequences (pairs, KTO samples) in rows twice ``data.max_seq_length``; the slots per
  row are fixed (one compiled shape) by the fullest row."""
  return preference.plan_item_rows(items, 2 * c.data.max_seq_length, pack=c.data.pack, size=size)


def packed_row(c, slots):
  return packing.build_row, c.data.max_seq_length
