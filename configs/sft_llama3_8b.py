"""SFT of Llama-3-8B on one node of 8 GPUs: FSDP over 8, bf16 compute with float32 master weights,
full activation recomputation, 4096-token packed rows.

python -m jalign.plan --config=configs/sft_llama3_8b.py          # memory and FLOPs, no GPU needed
python -m jalign.train --config=configs/sft_llama3_8b.py --config.model.init=hf:/path/to/Meta-Llama-3-8B
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "sft"
  c.run_dir = "runs/sft_llama3_8b"
  c.model.init = "random"  # point at a Hugging Face folder: hf:/path/to/Meta-Llama-3-8B
  c.model.preset = "llama3-8b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 1, "pipeline": 1})
  c.data.max_seq_length = 4096
  c.data.pack = True
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 1
  c.train.max_steps = 1000
  c.optimizer.lr = 3e-5
  c.optimizer.weight_decay = 0.01
  return c
