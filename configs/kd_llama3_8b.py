"""Knowledge distillation into Llama-3-8B from a larger teacher's top-100 logits per token (NeMo-
Aligner's default K), KL plus an SFT term, on one node of 8 GPUs (FSDP 8), 4096-token packed rows.

python -m jalign.plan --config=configs/kd_llama3_8b.py   # memory and FLOPs, no GPU needed
python -m jalign.distill --config=configs/kd_llama3_8b.py \\
    --config.kd.teacher=hf:/path/to/Llama-3-70B-Instruct --config.data.train=chats.jsonl   # on the teacher's GPUs
python -m jalign.train --config=configs/kd_llama3_8b.py \\
    --config.model.init=hf:/path/to/Llama-3-8B --config.data.train=chats.jsonl
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kd"
  c.run_dir = "runs/kd_llama3_8b"
  c.model.init = "random"  # hf:/path/to/Llama-3-8B
  c.model.preset = "llama3-8b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.format = "chat"
  c.data.train = "bundled:sft_chat_train.jsonl"
  c.data.validation = "bundled:sft_chat_val.jsonl"
  c.data.max_seq_length = 4096
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 1, "pipeline": 1})
  c.train.global_batch_size = 64
  c.train.micro_batch_size = 1
  c.train.max_steps = 1000
  c.optimizer.lr = 1e-5
  c.optimizer.min_lr = 1e-6
  c.kd.teacher = "hf:/path/to/Llama-3-70B-Instruct"
  c.kd.top_k = 100
  c.kd.topk_dir = "runs/kd_topk_llama3_8b"
  c.kd.kd_weight = 1.0
  c.kd.sft_weight = 0.4  # the tutorial's mix
  return c
