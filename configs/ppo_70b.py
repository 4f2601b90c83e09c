"""PPO of Llama-3-70B with a Llama-3-70B critic and reward model, NeMo-Aligner's layout: the actor job
on 8 nodes of 8 GPUs (64), the critic job with the reward model on 4 nodes (32); tensor parallel 8
inside a node, FSDP across nodes; 512 rollouts per step, 64 per optimizer step (8 steps), up to
2048 generated tokens in a 4096-token window.

python -m jalign.plan --config=configs/ppo_70b.py   # memory, FLOPs and step times, no GPU needed

Training takes the SFT policy and a reward model run (algorithm rm, e.g. configs/rm_llama3_70b.py),
and runs as two jobs: the critic job serves the critic and the reward model, the actor job trains
against it. scripts/ppo_critic.sbatch and scripts/ppo_actor.sbatch launch them (docs/scale.md); each
runs, on every process of its job:

python -m jalign.serve --config=configs/ppo_70b.py --config.critic.init=run:<rm run> \
    --config.critic.reward_model=run:<rm run> --config.critic.serve_address=0.0.0.0:5556
python -m jalign.train --config=configs/ppo_70b.py --config.model.init=hf:/path/to/Llama-3-70B-SFT \
    --config.critic.init=run:<rm run> --config.critic.reward_model=run:<rm run> \
    --config.critic.server=<critic job's first node>:5556
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "ppo"
  c.run_dir = "runs/ppo_70b"
  c.model.init = "random"  # the SFT policy: hf:/path/to/Llama-3-70B-SFT or run:<folder>
  c.model.preset = "llama3-70b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.format = "prompt"
  c.data.train = "bundled:prompts_train.jsonl"  # {"text": prompt} per line
  c.data.validation = ""
  c.data.max_seq_length = 4096
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 8, "pipeline": 1})
  c.train.global_batch_size = 64
  c.train.micro_batch_size = 1
  c.train.max_steps = 1000
  c.optimizer.lr = 9e-7
  c.optimizer.min_lr = 9e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.warmup_steps = 10
  c.rollout.num_prompts = 512
  c.rollout.micro_batch_size = 8
  c.rollout.max_new_tokens = 2048
  c.ppo.kl_coef = 0.01
  c.critic.init = "random"  # run:<reward model run>: the critic starts from the reward model
  c.critic.reward_model = "random"  # run:<reward model run>
  c.critic.preset = "llama3-70b"
  c.critic.mesh.update({"data": 1, "fsdp": 4, "tensor": 8, "pipeline": 1})
  c.critic.global_batch_size = 64
  c.critic.micro_batch_size = 1
  return c
