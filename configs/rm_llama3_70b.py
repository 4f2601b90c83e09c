"""A HelpSteer2-style regression reward model on Llama-3-70B: nine attribute scores per conversation
(-100 where one is missing), NeMo-Aligner's recipe (lr 2e-6 constant, 128 conversations per step,
4096 tokens), on 4 nodes of 8 GPUs: tensor parallel 8 inside a node, FSDP over the nodes.

python -m jalign.plan --config=configs/rm_llama3_70b.py   # memory and FLOPs, no GPU needed
python -m jalign.train --config=configs/rm_llama3_70b.py \\
    --config.model.init=hf:/path/to/Llama-3-70B-SFT \\
    --config.data.train=helpsteer2_train.jsonl --config.data.validation=helpsteer2_val.jsonl
"""

from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rm"
  c.run_dir = "runs/rm_llama3_70b"
  c.model.init = "random"  # hf:/path/to/an SFT Llama-3-70B
  c.model.preset = "llama3-70b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.tokenizer = "model"  # the checkpoint's own
  c.data.format = "regression"  # {"text": conversation, "label": [9 floats]}
  c.data.train = "bundled:regression_train.jsonl"
  c.data.validation = "bundled:regression_val.jsonl"
  c.data.max_seq_length = 4096
  c.rm.num_attributes = 9  # helpfulness, correctness, coherence, complexity, verbosity, ...
  c.mesh.update({"data": 1, "fsdp": 4, "tensor": 8, "pipeline": 1})
  c.train.global_batch_size = 128
  c.train.micro_batch_size = 2
  c.train.max_steps = 317  # two epochs of HelpSteer2
  c.optimizer.lr = 2e-6
  c.optimizer.min_lr = 2e-6  # constant
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.1
  return c
