"""SteerLM 2.0 of the tiny model on the bundled groups: four answers sampled for each question and the
label correctness:4, the attribute model's importance weights on the right one. The model learns to
prefer the heavily weighted answer (top_weight_accuracy) and KL(w || b) falls.

python -m jalign.train --config=configs/steerlm2_tiny.py
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "steerlm2"
  c.run_dir = "runs/steerlm2_tiny"
  c.model.init = "random"  # a SteerLM model (attribute-conditioned SFT): run:<folder>
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "steerlm2"
  c.data.train = "bundled:steerlm2_train.jsonl"
  c.data.validation = "bundled:steerlm2_val.jsonl"
  c.data.max_seq_length = 80
  c.data.pad_to_multiple_of = 16
  c.data.chat_prompt_tokens = "extra_id"  # SteerLM's <extra_id_N> format, the label after the assistant's name
  c.steerlm2.responses = 4
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 200
  c.train.val_check_interval = 50
  c.train.save_interval = 100
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 10
  return c
