"""KTO: unpaired feedback, the KL reference point from mismatched prompt/response pairs."""

import functools

import ml_collections

from jalign.data import preference
from jalign.losses import dpo, kto
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec, message_format, require


def block():
  b = ml_collections.ConfigDict()
  b.beta = 0.2                 # ref_policy_kl_penalty
  b.desirable_weight = 1.0     # desirable_loss_weight
  b.undesirable_weight = 1.0   # undesirable_loss_weight
  return b


def validate(c, check_files):
  require(c.kto.beta > 0, "kto.beta", "must be positive")


def encode(c, tok, records, path):
  d = c.data
  feedback, stats = preference.encode_feedback(records, tok, max_length=d.max_seq_length,
                                               chat_format=message_format(c, tok), add_eos=d.add_eos)
  return preference.kto_items(feedback, max_length=d.max_seq_length), stats


def row(c, slots):
  return functools.partial(preference.feedback_row, max_items=slots), 2 * c.data.max_seq_length


def parts(c, model):
  p = c.kto
  loss_fn = functools.partial(kto.train_loss, beta=p.beta, desirable_weight=p.desirable_weight,
                              undesirable_weight=p.undesirable_weight)
  return model, loss_fn, dpo.reference_logprobs


SPEC = AlgorithmSpec("kto", formats=("kto",), blocks={"kto": block}, validate=validate, encode=encode,
                     plan=encoders.slotted_rows, row=row, parts=parts)
