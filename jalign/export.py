"""Export a trained policy or reward model: ``python -m jalign.export --run=<run folder> --format=hf|trtllm
--out=<folder>``.

``hf`` writes a Hugging Face folder (transformers, vLLM and others load it); ``trtllm`` a TensorRT-LLM
checkpoint split for ``--tp_size`` x ``--pp_size`` GPUs, which ``trtllm-build`` turns into an engine.
A reward model run (algorithm ``rm``) exports to ``hf`` only, as a LlamaForSequenceClassification folder
(which PPO and REINFORCE also read back, ``hf:<folder>``); a head with a bias, a regression reward
model's, has no place there and is refused. The run's latest checkpoint is exported unless ``--step``
names another; LoRA adapters are merged in; the run's tokenizer is saved alongside. The model is read
sharded over every device of the process and each tensor gathered alone as it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jalign.models import Transformer, hf, hf_value, lora
from jalign.models.heads import ValueModel
from jalign.models.safetensors_io import CheckpointError
from jalign.recipes.build import load_trained, tool_mesh
from jalign.specs.base import ConfigError

FORMATS = ("hf", "trtllm")


def export(run_dir, out, *, format: str = "hf", step: int | None = None, dtype: str | None = None,
           tp_size: int = 1, pp_size: int = 1, overwrite: bool = False) -> Path:
  """Write the policy (or reward model) of jalign run folder ``run_dir`` to ``out``; returns the folder
  written."""
  if format not in FORMATS:
    raise ValueError(f"--format={format!r}: one of {', '.join(FORMATS)}")
  if format == "hf" and (tp_size, pp_size) != (1, 1):
    raise ValueError("--tp_size/--pp_size split TensorRT-LLM checkpoints; a Hugging Face folder is whole")
  out = Path(out)
  if out.exists() and any(out.iterdir()) and not overwrite:  # before the minutes a restore can take
    raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
  model, tokenizer, c = load_trained(run_dir, step, mesh=tool_mesh())
  if isinstance(model, ValueModel) and format != "hf":
    raise ValueError(f"{run_dir}: a {c.algorithm} run trains a reward model; --format=hf exports it, "
                     f"{format} takes language models only")
  if not isinstance(model, (Transformer, ValueModel)):
    raise ValueError(f"{run_dir}: a {c.algorithm} run trains a {type(model).__name__}, which is not exported")
  if lora.has_lora(model):
    model = lora.merge_lora(model)
  if format == "hf":
    save = hf_value.save if isinstance(model, ValueModel) else hf.save
    return save(model, out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)
  from jalign.rollout import trtllm
  return trtllm.export_checkpoint(model, out, tp_size=tp_size, pp_size=pp_size, dtype=dtype, tokenizer=tokenizer,
                                  overwrite=overwrite)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True, help="a jalign run folder (config.json and checkpoints/)")
  p.add_argument("--out", required=True, help="the folder to write")
  p.add_argument("--format", default="hf", choices=FORMATS)
  p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
  p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the parameters')")
  p.add_argument("--tp_size", type=int, default=1, help="trtllm: tensor-parallel ranks of the engine")
  p.add_argument("--pp_size", type=int, default=1, help="trtllm: pipeline-parallel ranks of the engine")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = p.parse_args(argv)
  try:
    path = export(args.run, args.out, format=args.format, step=args.step, dtype=args.dtype, tp_size=args.tp_size,
                  pp_size=args.pp_size, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{path}: {args.format} export of {args.run}")


if __name__ == "__main__":
  main()
