"""Reward models: a value head on the model's last real token, trained on comparison pairs
(Bradley-Terry) or on regression labels (SteerLM's attributes)."""

import functools

import ml_collections
from flax import nnx

from jalign.data import formats, preference
from jalign.data.prompts import encode_regression, regression_rows
from jalign.losses import rm
from jalign.models.heads import ValueModel
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.kind = "regular"            # comparison data: regular | margin | scaled (strength = chosen_reward - rejected_reward)
  b.num_attributes = 1          # regression data (SteerLM): attributes per label, -100 marks a missing one
  return b


def validate(c, check_files):
  require(c.rm.kind in rm.BT_KINDS, "rm.kind", f"{c.rm.kind!r} is not one of {rm.BT_KINDS}")
  require(c.rm.num_attributes >= 1, "rm.num_attributes", "must be at least 1")


def _regression(c) -> bool:
  return c.data.format == "regression"


def encode(c, tok, records, path):
  if not _regression(c):
    return encoders.comparison_pairs(c, tok, records, path)
  try:
    return encode_regression(records, tok, max_length=c.data.max_seq_length, num_attributes=c.rm.num_attributes)
  except ValueError as e:  # a label of the wrong size: name the file and the key to change
    raise formats.DataError(f"{path}: {e} (config.rm.num_attributes)") from None


def plan(c, items):
  return encoders.one_per_row(c, items) if _regression(c) else encoders.slotted_rows(c, items)


def row(c, slots):
  if _regression(c):
    return functools.partial(regression_rows, num_attributes=c.rm.num_attributes), c.data.max_seq_length
  return functools.partial(preference.pairs_row, max_pairs=slots), 2 * c.data.max_seq_length


def parts(c, model):
  if _regression(c):
    return ValueModel.from_transformer(model, c.rm.num_attributes, rngs=nnx.Rngs(c.seed)), rm.regression_train_loss, None
  return (ValueModel.from_transformer(model, 1, rngs=nnx.Rngs(c.seed)),
          functools.partial(rm.train_loss, kind=c.rm.kind), None)


SPEC = AlgorithmSpec("rm", formats=("comparison", "regression"), blocks={"rm": block}, validate=validate,
                     encode=encode, plan=plan, row=row, parts=parts,
                     lora_also_trains=nnx.All(nnx.Param, nnx.PathContains("head")))
