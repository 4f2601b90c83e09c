"""GRPO of the real SmolLM2-135M-Instruct on the bundled arithmetic problems, prompts in the model's own
chat template (ChatML), rewarded by the math verifier (1 for the right final answer). Sized for a CPU:
8 problems x 8 answers a rollout, one optimizer step per rollout.

python -m jalign.train --config=configs/grpo_smollm2.py
python -m jalign.evaluate --run=runs/grpo_smollm2 --data=bundled:arithmetic_val.jsonl --samples=4
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "grpo"
  c.run_dir = "runs/grpo_smollm2"
  c.model.init = "smollm2"
  c.tokenizer = "model"
  c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1, "pipeline": 1})
  c.data.format = "problem"
  c.data.chat_template = "model"
  c.data.train = "bundled:arithmetic_train.jsonl"
  c.data.validation = "bundled:arithmetic_val.jsonl"
  c.data.max_seq_length = 160
  c.grpo.preset = "dr_grpo"
  c.grpo.reward_functions = "jalign.rewards.math_answers:final_answer"
  c.rollout.num_prompts = 8
  c.rollout.samples_per_prompt = 8
  c.rollout.micro_batch_size = 64
  c.rollout.max_new_tokens = 48
  c.rollout.continuous_batching = True
  c.rollout.pad_to_multiple = 32
  c.train.global_batch_size = 64
  c.train.micro_batch_size = 8
  c.train.max_steps = 20
  c.train.val_check_interval = 10  # val_reward: the accuracy of one sample of each held-out problem
  c.train.save_interval = 10
  c.optimizer.lr = 1e-6
  c.optimizer.min_lr = 1e-6
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 0
  return c
