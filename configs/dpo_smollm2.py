"""DPO of the real SmolLM2-135M-Instruct on the bundled preference pairs, prompts in the model's own
chat template (ChatML), with NeMo-Aligner's DPO settings scaled to a CPU: beta 0.2, summed log-probs,
lr 9e-6 to 9e-7.

python -m jalign.train --config=configs/dpo_smollm2.py
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "dpo"
  c.run_dir = "runs/dpo_smollm2"
  c.model.init = "smollm2"
  c.tokenizer = "model"
  # Shard parameters, Adam moments and the reference copy over all devices.
  c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1, "pipeline": 1})
  c.data.format = "comparison"
  c.data.chat_template = "model"  # the tokenizer's own template; "nemo" renders NeMo-Aligner's chat format
  c.data.train = "bundled:pref_train.jsonl"
  c.data.validation = "bundled:pref_val.jsonl"
  c.data.max_seq_length = 128
  c.data.pad_to_multiple_of = 16
  c.data.pack = True  # several pairs per row of 2 x max_seq_length: global_batch_size counts rows
  c.dpo.beta = 0.2
  c.dpo.loss_type = "dpo"
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 4
  c.train.max_steps = 40
  c.train.val_check_interval = 20
  c.train.save_interval = 20
  c.optimizer.lr = 9e-6
  c.optimizer.min_lr = 9e-7
  c.optimizer.weight_decay = 0.1
  c.optimizer.warmup_steps = 4
  return c
