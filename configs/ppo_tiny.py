"""PPO of the tiny model on the bundled chat prompts, with a critic started from the tiny reward model
that also scores the rollouts. Train the SFT policy and the reward model first:

python -m jalign.train --config=configs/sft_tiny.py
python -m jalign.train --config=configs/rm_tiny.py
python -m jalign.train --config=configs/ppo_tiny.py [--config.train.max_steps=100 ...]
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "ppo"
  c.run_dir = "runs/ppo_tiny"
  c.model.init = "run:runs/sft_tiny"
  c.model.preset = "tiny"
  c.tokenizer = "tiny"
  c.data.format = "prompt"
  c.data.train = "bundled:prompts_train.jsonl"
  c.data.validation = "bundled:prompts_val.jsonl"
  c.data.max_seq_length = 80  # the reward model's (configs/rm_tiny.py)
  c.rollout.num_prompts = 64
  c.rollout.micro_batch_size = 64
  c.rollout.max_new_tokens = 24
  c.ppo.kl_coef = 0.01
  c.critic.init = "run:runs/rm_tiny"  # the critic starts from the reward model, as in NeMo-Aligner
  c.critic.reward_model = "run:runs/rm_tiny"
  c.critic.mesh.update({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
  c.critic.global_batch_size = 16
  c.critic.micro_batch_size = 8
  c.critic.lr = 1e-3
  c.critic.min_lr = 1e-4
  c.critic.weight_decay = 0.01
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.max_steps = 200
  c.train.save_interval = 50
  c.train.val_check_interval = 25  # the reward of one reply to each validation prompt
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 4
  return c
