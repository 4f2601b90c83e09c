"""Regression (SteerLM) reward model on the tiny model: two attribute scores per conversation, correctness
(4 for a right fact, 0 for a wrong one, sometimes missing) and verbosity.

python -m jalign.train --config=configs/rm_regression_tiny.py
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rm"
  c.run_dir = "runs/rm_regression_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "regression"
  c.data.train = "bundled:regression_train.jsonl"
  c.data.validation = "bundled:regression_val.jsonl"
  c.data.max_seq_length = 80
  c.data.pad_to_multiple_of = 16
  c.rm.num_attributes = 2  # correctness, verbosity
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 300
  c.train.val_check_interval = 50
  c.train.save_interval = 100
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 10
  return c
