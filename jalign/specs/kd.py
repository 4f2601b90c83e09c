"""Knowledge distillation from the teacher's top-K logits, computed beforehand by
``python -m jalign.distill`` into ``kd.topk_dir``."""

import functools
from pathlib import Path

import ml_collections

from jalign.data import distillation
from jalign.losses import kd
from jalign.specs import encoders
from jalign.specs.base import AlgorithmSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.teacher = ""                # a model init: run:<folder> | hf:<folder> | gguf:<file> | smollm2
  b.top_k = 16
  b.topk_dir = "runs/kd_topk"
  b.kind = "bwd_kl"             # kd_loss: bwd_kl (KL(student||teacher), NeMo's default) | fwd_kl
  b.kd_weight = 1.0
  b.sft_weight = 0.0
  return b


def validate(c, check_files):
  require(bool(c.kd.teacher), "kd.teacher", "name the teacher model (run:<folder>, hf:<folder>, ...)")
  require(c.kd.kind in kd.KINDS, "kd.kind", f"{c.kd.kind!r} is not fwd_kl or bwd_kl")
  require(c.kd.top_k >= 1, "kd.top_k", "must be at least 1")
  require(c.kd.kd_weight > 0 or c.kd.sft_weight > 0, "kd.kd_weight", "kd_weight and sft_weight are both 0")


def encode(c, tok, records, path: Path):
  """SFT examples with the teacher's top-K logits that ``jalign.distill`` stored for this file."""
  examples, stats = encoders.sft_records(c, tok, records, path)
  topk = distillation.topk_path(c.kd.topk_dir, path)
  return distillation.load_topk(topk, examples, distillation.fingerprint(examples)), stats


def row(c, slots):
  return functools.partial(distillation.kd_row, top_k=c.kd.top_k), c.data.max_seq_length


def parts(c, model):
  p = c.kd
  return model, functools.partial(kd.train_loss, kind=p.kind, kd_weight=p.kd_weight, sft_weight=p.sft_weight), None


SPEC = AlgorithmSpec("kd", formats=("chat", "prompt_response"), blocks={"kd": block}, validate=validate,
                     encode=encode, plan=encoders.packed_rows, row=row, parts=parts)
