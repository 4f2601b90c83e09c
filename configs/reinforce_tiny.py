"""REINFORCE (RLOO baseline) of the tiny model on the bundled chat prompts, rewarded by the tiny reward
model: train that first (python -m jalign.train --config=configs/rm_tiny.py), then

python -m jalign.train --config=configs/reinforce_tiny.py [--config.model.init=run:runs/sft_tiny ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "reinforce"
  c.run_dir = "runs/reinforce_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "prompt"
  c.data.train = "bundled:prompts_train.jsonl"
  c.data.validation = "bundled:prompts_val.jsonl"
  c.data.max_seq_length = 80  # the reward model's (configs/rm_tiny.py)
  c.reinforce.reward_model = "run:runs/rm_tiny"
  c.rollout.num_prompts = 16
  c.rollout.samples_per_prompt = 4
  c.rollout.micro_batch_size = 64
  c.rollout.max_new_tokens = 24
  c.reinforce.kl_coef = 0.01
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 200
  c.train.save_interval = 50
  c.train.val_check_interval = 25  # the reward of one reply to each validation prompt
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 4
  return c
