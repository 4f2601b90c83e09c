"""Knowledge distillation into a fresh tiny model from the teacher's top-16 logits on the bundled chats.

  python -m jalign.train --config=configs/sft_tiny.py            # the teacher, in runs/sft_tiny
  python -m jalign.distill --config=configs/kd_tiny.py           # its top-K logits, in runs/kd_topk_tiny
  python -m jalign.train --config=configs/kd_tiny.py             # the student
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kd"
  c.run_dir = "runs/kd_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "chat"
  c.data.train = "bundled:sft_chat_train.jsonl"
  c.data.validation = "bundled:sft_chat_val.jsonl"
  c.data.max_seq_length = 128
  c.data.pack = True
  c.kd.teacher = "run:runs/sft_tiny"
  c.kd.top_k = 16
  c.kd.topk_dir = "runs/kd_topk_tiny"
  c.kd.kind = "bwd_kl"
  c.kd.kd_weight = 1.0
  c.kd.sft_weight = 0.0
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 300
  c.train.val_check_interval = 100
  c.train.save_interval = 100
  c.optimizer.lr = 3e-3
  c.optimizer.min_lr = 3e-4
  c.optimizer.warmup_steps = 10
  return c
