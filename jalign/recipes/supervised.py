"""Training on a data file: SFT, reward models, DPO and its family, KTO, distillation and SteerLM 2.0.
The algorithm's spec says how the file becomes batches and what the loss is; the rest is shared."""

from __future__ import annotations

from pathlib import Path

from jalign.recipes.build import build_trainer


def run(c, log=print) -> dict:
  """Train with a ConfigDict; returns the trainer's summary (with the loss of every step run)."""
  loop = build_trainer(c, log)
  summary = loop.run()
  summary["losses"] = loop.losses
  log(f"{summary['stopped']} after {summary['steps']} steps; run folder: {Path(c.run_dir).absolute()}")
  return summary
