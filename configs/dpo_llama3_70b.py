"""DPO of Llama-3-70B on 4 nodes of 8 GPUs (32): tensor parallel 8 inside a node, FSDP over the 4
nodes; bf16 compute with float32 master weights, full activation recomputation; a pair's two
responses share one 8192-token row (2 x 4096); 128 pairs per step, one per data-parallel rank at a
time; the frozen reference in host memory between reference passes, as NeMo-Aligner swaps it in.

python -m jalign.plan --config=configs/dpo_llama3_70b.py   # memory and FLOPs, no GPU needed
python -m jalign.train --config=configs/dpo_llama3_70b.py \\
    --config.model.init=hf:/path/to/Llama-3-70B-SFT --config.data.train=pairs.jsonl
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "dpo"
  c.run_dir = "runs/dpo_llama3_70b"
  c.model.init = "random"  # hf:/path/to/an SFT Llama-3-70B
  c.model.preset = "llama3-70b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.chat_template = "model"  # and its own chat template
  c.data.format = "comparison"
  c.data.train = "bundled:pref_train.jsonl"
  c.data.validation = "bundled:pref_val.jsonl"
  c.data.max_seq_length = 4096
  c.data.pack = False
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 8, "pipeline": 1})
  c.train.global_batch_size = 128
  c.train.micro_batch_size = 1
  c.train.max_steps = 500
  c.optimizer.lr = 9e-7       # NeMo's advice for large models: 5e-7 to 9e-7
  c.optimizer.min_lr = 9e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.warmup_steps = 10
  c.dpo.beta = 0.2
  c.reference.offload = True
  return c
