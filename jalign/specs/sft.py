"""Supervised fine-tuning: the next-token loss on the responses of chat or prompt/response data."""

from jalign.losses import sft
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec


def parts(c, model):
  return model, sft.loss, None


SPEC = AlgorithmSpec("sft", formats=("chat", "prompt_response"), encode=encoders.sft_records,
                     plan=encoders.packed_rows, row=encoders.packed_row, parts=parts)
