"""SteerLM 2.0 of a Llama-3-8B SteerLM model on one node of 8 GPUs: groups of 4 responses sampled per
prompt and attribute label, one group per 4 x 4096-token row, 64 groups per step. The long rows want
tensor parallelism (FSDP 2 x tensor 4) to keep the attention's working set small.

python -m jalign.plan --config=configs/steerlm2_llama3_8b.py   # memory and FLOPs, no GPU needed
python -m jalign.train --config=configs/steerlm2_llama3_8b.py \\
    --config.model.init=hf:/path/to/Llama-3-8B-SteerLM --config.data.train=groups.jsonl
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "steerlm2"
  c.run_dir = "runs/steerlm2_llama3_8b"
  c.model.init = "random"  # hf:/path/to/an attribute-conditioned (SteerLM) Llama-3-8B
  c.model.preset = "llama3-8b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.format = "steerlm2"
  c.data.train = "bundled:steerlm2_train.jsonl"
  c.data.validation = "bundled:steerlm2_val.jsonl"
  c.data.max_seq_length = 4096
  c.data.chat_prompt_tokens = "extra_id"
  c.steerlm2.responses = 4
  c.mesh.update({"data": 1, "fsdp": 2, "tensor": 4, "pipeline": 1})
  c.train.global_batch_size = 64
  c.train.micro_batch_size = 1
  c.train.max_steps = 500
  c.optimizer.lr = 1e-6
  c.optimizer.min_lr = 1e-7
  c.optimizer.weight_decay = 0.1
  return c
