"""SteerLM 2.0: groups of responses sampled for one prompt and attribute label, one group a row."""

import functools

import ml_collections

from jalign.data import formats, preference
from jalign.losses import steerlm2
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec, message_format, require


def block():
  b = ml_collections.ConfigDict()
  b.responses = 4         # responses per prompt at most (a row holds one group)
  return b


def validate(c, check_files):
  require(c.steerlm2.responses >= 2, "steerlm2.responses", "must be at least 2")


def encode(c, tok, records, path):
  groups, stats = preference.encode_groups(records, tok, max_length=c.data.max_seq_length,
                                           chat_format=message_format(c, tok), over_length=c.data.over_length)
  largest = max((len(g.responses) for g in groups), default=0)
  if largest > c.steerlm2.responses:
    raise formats.DataError(f"{path}: a prompt has {largest} responses, more than config.steerlm2.responses "
                            f"= {c.steerlm2.responses}")
  return groups, stats


def row(c, slots):
  n = c.steerlm2.responses
  return functools.partial(preference.group_row, group_size=n), n * c.data.max_seq_length


def parts(c, model):
  return model, steerlm2.train_loss, None


SPEC = AlgorithmSpec("steerlm2", formats=("steerlm2",), blocks={"steerlm2": block}, validate=validate,
                     encode=encode, plan=encoders.one_per_row, row=row, parts=parts)
