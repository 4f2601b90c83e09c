"""Online rejection sampling of the tiny model on the bundled chat prompts: each prompt's best of four
samples, by the tiny reward model, is trained on with the SFT loss. Train the reward model first
(python -m jalign.train --config=configs/rm_tiny.py), then

python -m jalign.train --config=configs/rs_tiny.py [--config.model.init=run:runs/sft_tiny ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rs"
  c.run_dir = "runs/rs_tiny"
  c.model.init = "random"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "prompt"
  c.data.train = "bundled:prompts_train.jsonl"
  c.data.validation = "bundled:prompts_val.jsonl"
  c.data.max_seq_length = 80  # the reward model's (configs/rm_tiny.py)
  c.reinforce.reward_model = "run:runs/rm_tiny"  # rollouts as REINFORCE samples and scores them
  c.rollout.num_prompts = 16
  c.rollout.samples_per_prompt = 4
  c.rollout.micro_batch_size = 64
  c.rollout.max_new_tokens = 24
  c.rs.top_n_rollouts = 1
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 100
  c.train.save_interval = 50
  c.train.val_check_interval = 25  # the reward of one reply to each validation prompt
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 4
  return c
