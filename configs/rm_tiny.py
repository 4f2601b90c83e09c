"""Bradley-Terry reward model on the tiny model and the bundled preference pairs (right vs wrong facts).

python -m jalign.train --config=configs/rm_tiny.py [--config.rm.kind=margin ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rm"
  c.run_dir = "runs/rm_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "comparison"
  c.data.train = "bundled:pref_train.jsonl"
  c.data.validation = "bundled:pref_val.jsonl"
  c.data.max_seq_length = 80
  c.data.pad_to_multiple_of = 16
  c.data.pack = False  # one pair per row; True packs several pairs into each row
  c.rm.kind = "regular"
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 300
  c.train.val_check_interval = 50
  c.train.save_interval = 100
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 10
  return c
