"""GRPO of the tiny model on the bundled arithmetic problems, rewarded by the math verifier (1 for the
right final answer). Start from a tiny model that has seen the problems' answer format: train
configs/sft_tiny.py on the arithmetic chats first,

python -m jalign.train --config=configs/sft_tiny.py --config.data.train=bundled:arithmetic_sft_train.jsonl \
    --config.data.validation="" --config.run_dir=runs/sft_arithmetic_tiny

then python -m jalign.train --config=configs/grpo_tiny.py (held-out accuracy: python -m jalign.evaluate).
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "grpo"
  c.run_dir = "runs/grpo_tiny"
  c.model.init = "run:runs/sft_arithmetic_tiny"
  c.tokenizer = "tiny"
  c.data.format = "problem"
  c.data.train = "bundled:arithmetic_train.jsonl"
  c.data.validation = "bundled:arithmetic_val.jsonl"
  c.data.max_seq_length = 96
  c.grpo.preset = "grpo"
  c.grpo.reward_functions = "jalign.rewards.math_answers:final_answer"
  c.rollout.num_prompts = 16
  c.rollout.samples_per_prompt = 8
  c.rollout.micro_batch_size = 64
  c.rollout.max_new_tokens = 12
  c.train.global_batch_size = 32
  c.train.micro_batch_size = 16
  c.train.max_steps = 100
  c.train.save_interval = 50
  c.train.val_check_interval = 25  # val_reward: the accuracy of one sample of each held-out problem
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 2
  return c
