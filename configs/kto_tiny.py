"""KTO of the tiny model on the bundled unpaired feedback (right answers desirable, wrong ones not):
the implicit rewards of desirable answers rise above those of undesirable ones.

python -m jalign.train --config=configs/kto_tiny.py [--config.kto.desirable_weight=1.33 ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kto"
  c.run_dir = "runs/kto_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "kto"
  c.data.train = "bundled:kto_train.jsonl"
  c.data.validation = "bundled:kto_val.jsonl"
  c.data.max_seq_length = 80
  c.data.pad_to_multiple_of = 16
  c.data.pack = False  # one sample (and its KL sample) per row; True packs several
  c.kto.beta = 0.2
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 200
  c.train.val_check_interval = 50
  c.train.save_interval = 100
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 10
  return c
