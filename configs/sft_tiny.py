"""SFT of the tiny model on the bundled chat data: learns visibly in about a minute on a laptop CPU.

python -m jalign.train --config=configs/sft_tiny.py [--config.train.max_steps=200 ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "sft"
  c.run_dir = "runs/sft_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "chat"
  c.data.train = "bundled:sft_chat_train.jsonl"
  c.data.validation = "bundled:sft_chat_val.jsonl"
  c.data.max_seq_length = 128
  c.data.pack = True
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 400
  c.train.val_check_interval = 100
  c.train.save_interval = 100
  c.optimizer.lr = 3e-3
  c.optimizer.min_lr = 3e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.01
  return c
