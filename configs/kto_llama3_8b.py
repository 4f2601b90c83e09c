"""KTO of Llama-3-8B on one node of 8 GPUs (FSDP 8): unpaired feedback, each sample with its
mismatched KL sample in one 2 x 4096-token row, 64 samples per step, the frozen reference in host
memory between reference passes.

python -m jalign.plan --config=configs/kto_llama3_8b.py   # memory and FLOPs, no GPU needed
python -m jalign.train --config=configs/kto_llama3_8b.py \\
    --config.model.init=hf:/path/to/Llama-3-8B-SFT --config.data.train=feedback.jsonl
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kto"
  c.run_dir = "runs/kto_llama3_8b"
  c.model.init = "random"  # hf:/path/to/an SFT Llama-3-8B
  c.model.preset = "llama3-8b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.chat_template = "model"  # and its own chat template
  c.data.format = "kto"
  c.data.train = "bundled:kto_train.jsonl"
  c.data.validation = "bundled:kto_val.jsonl"
  c.data.max_seq_length = 4096
  c.data.pack = False
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 1, "pipeline": 1})
  c.train.global_batch_size = 64
  c.train.micro_batch_size = 1
  c.train.max_steps = 1000
  c.optimizer.lr = 5e-7
  c.optimizer.min_lr = 5e-8
  c.optimizer.weight_decay = 0.1
  c.kto.beta = 0.2
  c.reference.offload = True
  return c
