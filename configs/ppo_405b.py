"""PPO of Llama-3.1-405B with a 405B critic and reward model, each job on 32 nodes of 8 GPUs (256).
Training shards every weight over all data-parallel devices (FSDP over data x fsdp = 32) with tensor
parallel 8 inside a node. A bf16 generation copy of 405B does not fit one node's tensor-parallel
shards (101 GB per GPU), so generation runs tensor parallel over 16 GPUs (fsdp x tensor, two nodes;
the 8 KV heads over tensor), and the copy is freed during training (NeMo's unload_engine_train).
128 rollouts per step in one 128-sample optimizer step, as in NeMo-Aligner's 405B run.

python -m jalign.plan --config=configs/ppo_405b.py   # memory, FLOPs and step times, no GPU needed
"""

from jalign.config import base_config

# Training: batch rows and weights over data x fsdp, Megatron tensor parallel over tensor.
TRAIN_RULES = (
    ("batch", ("data", "fsdp")),
    ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ("layers", "pipeline"),
    ("vocab", "tensor"), ("embed", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)
# Generation: rows over data, tensor parallel over fsdp x tensor (16), weights whole along embed.
GENERATION_RULES = (
    ("batch", "data"),
    ("act_heads", ("fsdp", "tensor")), ("act_kv_heads", "tensor"), ("act_mlp", ("fsdp", "tensor")),
    ("act_vocab", ("fsdp", "tensor")),
    ("vocab", ("fsdp", "tensor")), ("heads", ("fsdp", "tensor")), ("kv_heads", "tensor"),
    ("mlp", ("fsdp", "tensor")),
)


def get_config():
  c = base_config()
  c.algorithm = "ppo"
  c.run_dir = "runs/ppo_405b"
  c.model.init = "random"  # the SFT policy: hf:/path/to/Llama-3.1-405B-SFT or run:<folder>
  c.model.preset = "llama3.1-405b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.format = "prompt"
  c.data.train = "bundled:prompts_train.jsonl"  # {"text": prompt} per line
  c.data.validation = ""
  c.data.max_seq_length = 4096
  c.mesh.update({"data": 16, "fsdp": 2, "tensor": 8, "pipeline": 1})
  c.sharding_rules = TRAIN_RULES
  c.train.global_batch_size = 128
  c.train.micro_batch_size = 1
  c.train.max_steps = 1000
  c.optimizer.lr = 1e-7
  c.optimizer.min_lr = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.warmup_steps = 10
  c.rollout.num_prompts = 128
  c.rollout.micro_batch_size = 8
  c.rollout.max_new_tokens = 2048
  c.ppo.kl_coef = 3e-3
  c.ppo.generation_rules = GENERATION_RULES
  c.ppo.unload_engine_train = True
  c.reference.offload = True
  c.critic.init = "random"  # run:<reward model run>
  c.critic.reward_model = "random"
  c.critic.preset = "llama3.1-405b"
  c.critic.mesh.update({"data": 16, "fsdp": 2, "tensor": 8, "pipeline": 1})
  c.critic.global_batch_size = 128
  c.critic.micro_batch_size = 1
  return c
