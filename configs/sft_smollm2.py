"""SFT of the real SmolLM2-135M-Instruct on the bundled chat data (NeMo-Aligner chat format).

python -m jalign.train --config=configs/sft_smollm2.py
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "sft"
  c.run_dir = "runs/sft_smollm2"
  c.model.init = "smollm2"
  c.tokenizer = "model"
  # Shard parameters and Adam moments over all devices rather than copying them to each.
  c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1, "pipeline": 1})
  c.data.format = "chat"
  c.data.max_seq_length = 256
  c.data.pack = True
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 4
  c.train.max_steps = 60
  c.train.val_check_interval = 20
  c.train.save_interval = 20
  c.optimizer.lr = 3e-5
  c.optimizer.warmup_steps = 5
  return c
