"""SPIN of the tiny model on the bundled chat data: each iteration it answers the prompts itself and DPO
teaches it to prefer the recorded replies over its own answers.

python -m jalign.train --config=configs/spin_tiny.py [--config.model.init=run:runs/sft_tiny ...]

SPIN is meant to start from an SFT model (``run:runs/sft_tiny`` after ``configs/sft_tiny.py``); from
random weights the first iteration's own answers are noise.
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "spin"
  c.run_dir = "runs/spin_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "chat"
  c.data.train = "bundled:sft_chat_train.jsonl"
  c.data.validation = "bundled:sft_chat_val.jsonl"
  c.data.max_seq_length = 128
  c.data.pad_to_multiple_of = 16
  c.spin.iterations = 3
  c.spin.epochs = 1
  c.rollout.max_new_tokens = 32
  c.rollout.micro_batch_size = 64
  c.dpo.beta = 0.2
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.val_check_interval = 16
  c.train.save_interval = 32
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 5
  return c
