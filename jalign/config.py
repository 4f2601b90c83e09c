"""The base ml_collections config every ``configs/*.py`` file starts from, and its validation.

``validate(config)`` runs before anything is built or compiled; its errors name the key, e.g.
``config.train.micro_batch_size: 6 does not divide the per-process batch of 16``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from jalign.parallel.mesh import DEFAULT_RULES, mesh_shape

ALGORITHMS = ("sft", "rm", "dpo", "kto", "kd", "steerlm2", "spin", "reinforce", "rs", "ppo")
# The jsonl format each algorithm reads (data.format).
FORMATS = {"sft": ("chat", "prompt_response"), "rm": ("comparison", "regression"), "dpo": ("comparison",),
           "kto": ("kto",), "kd": ("chat", "prompt_response"), "steerlm2": ("steerlm2",), "spin": ("chat",),
           "reinforce": ("prompt",), "rs": ("prompt",), "ppo": ("prompt",)}
MODEL_INITS = ("random", "smollm2")  # or "hf:<folder>", "gguf:<file>", "run:<jalign run folder>"


class ConfigError(ValueError):
  pass


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.run_dir = "runs/run"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.init = "random"          # random | smollm2 | hf:<folder> | gguf:<file> | run:<jalign run folder>
  c.model.preset = "tiny"          # LlamaConfig.preset name, for init=random
  c.model.dtype = "float32"        # compute dtype (bfloat16 with float32 master weights is the GPU norm)
  c.model.param_dtype = "float32"
  c.model.remat = "none"

  c.tokenizer = "model"            # model (the checkpoint's own) | tiny | <folder with tokenizer.json>

  c.data = ml_collections.ConfigDict()
  c.data.format = "chat"           # chat | prompt_response
  c.data.train = "bundled:sft_chat_train.jsonl"
  c.data.validation = "bundled:sft_chat_val.jsonl"  # "" for none
  c.data.max_seq_length = 256
  c.data.pack = True
  c.data.pad_to_multiple_of = 0    # 0: every batch is max_seq_length wide; N: cut to the longest row, rounded up to N
  c.data.shuffle = True
  c.data.prompt_template = "{input} {output}"
  c.data.truncation = "right"      # which end of the prompt is cut when an example is too long
  c.data.add_bos = False
  c.data.add_eos = True
  c.data.chat_prompt_tokens = "default"  # default (\x00 \x11 \x12) | extra_id (<extra_id_N>)
  c.data.chat_template = "nemo"    # message prompts of comparison/kto data: nemo (NeMo's chat format with
                                   # chat_prompt_tokens) | model (the tokenizer's own jinja chat template)
  c.data.skip_bad_lines = False
  c.data.over_length = "truncate"  # pairs too long: truncate the prompt's left end (drop if the response alone
                                   # does not fit) | drop (drop the pair); both counted in data_stats.json

  # Preference optimisation (algorithm dpo), NeMo-Aligner's names in comments.
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.2                 # ref_policy_kl_penalty
  c.dpo.loss_type = "dpo"          # preference_loss: dpo | ipo | rpo_sq | rpo_fwd_kl | rpo_bwd_kl | simpo
  c.dpo.label_smoothing = 0.0      # conservative DPO
  c.dpo.gt_reward_scale = 1.0
  c.dpo.simpo_gamma = 0.5
  c.dpo.average_log_probs = False  # preference_average_log_probs
  c.dpo.preference_weight = 1.0    # preference_loss_weight
  c.dpo.sft_weight = 0.0           # sft_loss_weight
  c.dpo.share_prompt = False       # compute each pair's prompt once (the responses as branches that see it)

  # KTO (algorithm kto): unpaired feedback; the KL reference point from mismatched prompt/response pairs.
  c.kto = ml_collections.ConfigDict()
  c.kto.beta = 0.2                 # ref_policy_kl_penalty
  c.kto.desirable_weight = 1.0     # desirable_loss_weight
  c.kto.undesirable_weight = 1.0   # undesirable_loss_weight

  # Knowledge distillation (algorithm kd) from the teacher's top-K logits, computed beforehand by
  # python -m jalign.distill --config=<this config> into kd.topk_dir.
  c.kd = ml_collections.ConfigDict()
  c.kd.teacher = ""                # a model init: run:<folder> | hf:<folder> | gguf:<file> | smollm2
  c.kd.top_k = 16
  c.kd.topk_dir = "runs/kd_topk"
  c.kd.kind = "bwd_kl"             # kd_loss: bwd_kl (KL(student||teacher), NeMo's default) | fwd_kl
  c.kd.kd_weight = 1.0
  c.kd.sft_weight = 0.0

  # SteerLM 2.0 (algorithm steerlm2): groups of responses sampled for one prompt and attribute label.
  c.steerlm2 = ml_collections.ConfigDict()
  c.steerlm2.responses = 4         # responses per prompt at most (a row holds one group)

  # SPIN (algorithm spin): iterations of DPO between the chat data's replies and the model's own, the
  # model at each iteration's start being the reference (dpo.beta, dpo.loss_type apply).
  c.spin = ml_collections.ConfigDict()
  c.spin.iterations = 3            # max_iterations
  c.spin.epochs = 1                # max_epochs per iteration: steps = ceil(epochs * pairs / global_batch_size)
  c.spin.max_new_tokens = 0        # length_params.max_length; 0: data.max_seq_length // 2
  c.spin.rollout_batch_size = 32   # rollout_micro_batch_size: prompts generated at once
  c.spin.temperature = 1.0
  c.spin.top_k = 0
  c.spin.top_p = 1.0
  c.spin.greedy = False

  # REINFORCE with the RLOO baseline (algorithm reinforce), NeMo-Aligner's names in comments: each
  # rollout samples num_rollouts_per_prompt responses to each of num_rollout_samples prompts, scores them
  # with the reward model, and trains on them for one epoch of global batches.
  c.reinforce = ml_collections.ConfigDict()
  c.reinforce.reward_model = ""    # run:<folder> of a jalign reward model (algorithm rm); scores tokens
  c.reinforce.num_rollout_samples = 512  # prompts per rollout
  c.reinforce.num_rollouts_per_prompt = 4
  c.reinforce.rollout_batch_size = 32    # rollout_micro_batch_size: sequences generated at once per data-parallel rank
  c.reinforce.max_new_tokens = 0   # length_params.max_length; 0: data.max_seq_length // 2
  c.reinforce.min_new_tokens = 1   # length_params.min_length
  c.reinforce.temperature = 1.0
  c.reinforce.top_k = 0
  c.reinforce.top_p = 1.0
  c.reinforce.kl_coef = 0.01       # initial_policy_kl_penalty
  c.reinforce.absolute_kl = True   # use_absolute_kl

  # Online rejection sampling (algorithm rs): rollouts sampled and scored as config.reinforce says (its KL
  # settings unused); each prompt's best samples are trained on with the SFT loss.
  c.rs = ml_collections.ConfigDict()
  c.rs.top_n_rollouts = 1          # top_n_rollouts: samples kept per prompt

  # Reward model (algorithm rm): a value head on the model's last real token.
  c.rm = ml_collections.ConfigDict()
  c.rm.kind = "regular"            # comparison data: regular | margin | scaled (strength = chosen_reward - rejected_reward)
  c.rm.num_attributes = 1          # regression data (SteerLM): attributes per label, -100 marks a missing one

  # LoRA (rank 0: off): only the adapters train and are saved; the DPO reference is the base model with
  # the adapters off. NeMo's defaults: rank (adapter_dim) 32, alpha = rank, targets attention_qkv.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 0.0               # 0: alpha = rank (scale 1)
  c.lora.targets = "attention_qkv"  # comma-separated: q,k,v,o,gate,up,down or NeMo's names (attention, mlp, all, ...)

  # The reference policy (dpo): a frozen copy of the starting weights; offload keeps it in host memory
  # between reference passes.
  c.reference = ml_collections.ConfigDict()
  c.reference.offload = False

  # PPO with a critic (algorithm ppo), NeMo-Aligner's names in comments. The actor job (policy training,
  # rollouts, the initial policy's log-probs) runs on ``mesh``; the critic job (critic training and
  # inference, the reward model) on ``critic.mesh``, as NeMo runs them as two jobs.
  c.ppo = ml_collections.ConfigDict()
  c.ppo.num_rollout_samples = 512  # prompts per PPO step
  c.ppo.rollout_micro_batch_size = 8  # prompts generated at once on each data-parallel rank
  c.ppo.max_new_tokens = 2048      # length_params.max_length
  c.ppo.min_new_tokens = 1         # length_params.min_length
  c.ppo.temperature = 1.0
  c.ppo.top_k = 0
  c.ppo.top_p = 1.0
  c.ppo.kl_coef = 0.01             # initial_policy_kl_penalty
  c.ppo.absolute_kl = True         # use_absolute_kl
  c.ppo.clip_eps = 0.2             # ratio_eps
  c.ppo.entropy_coef = 0.0         # entropy_bonus
  c.ppo.gamma = 1.0                # discount_factor
  c.ppo.lam = 0.95                 # gae_lambda
  c.ppo.normalize_advantages = True
  c.ppo.offload_adam_states = True  # the actor's optimizer state in pinned host memory while rollouts generate and score
  c.ppo.unload_engine_train = False  # free the generation copy of the weights while training
  # Logical-axis rules of the generation copy of the weights and of generation's activations; empty:
  # the training rules with parameters sharded over tensor only (replicated over data and fsdp).
  c.ppo.generation_rules = ()

  c.critic = ml_collections.ConfigDict()
  c.critic.init = "random"         # run:<reward model run> (NeMo starts the critic from the RM)
  c.critic.preset = "tiny"         # with init=random
  c.critic.reward_model = "random"  # run:<reward model run>; random: a model of critic.preset
  c.critic.mesh = ml_collections.ConfigDict({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
  c.critic.global_batch_size = 64
  c.critic.micro_batch_size = 1
  c.critic.lr = 9e-6
  c.critic.min_lr = 9e-7
  c.critic.weight_decay = 0.1
  c.critic.loss_clip = 0.2         # loss_clip_val
  c.critic.offload_adam_states = True  # while serving values and rewards
  # Where the critic job runs: "" in the actor's process; "host:port" the HTTP address of a critic server
  # started by python -m jalign.serve (NeMo's remote_critic_rm.critic.{ip,port}).
  c.critic.server = ""
  c.critic.serve_address = "127.0.0.1:5556"  # what python -m jalign.serve binds (0.0.0.0:<port> for other hosts)
  c.critic.overlap_train = True  # with a server: the critic trains while the actor does (NeMo does not await it)

  # python -m jalign.serve with generation.serve: config.model (the policy, with the config's tokenizer)
  # served for generation (jalign.serve.generation), on a ppo config's critic server, else at serve_address.
  c.generation = ml_collections.ConfigDict()
  c.generation.serve = False
  c.generation.serve_address = "127.0.0.1:5557"

  # Mesh axis sizes (-1: fill with the remaining devices) and the logical-axis rules table.
  c.mesh = ml_collections.ConfigDict({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = DEFAULT_RULES

  # Multi-host: empty values are found from the environment (Slurm, Open MPI) when there is one.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.local_device_count = 0  # CPU only: devices per process

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8  # rows per micro-batch on each data-parallel rank (NeMo's meaning)
  c.train.pipeline_microbatches = 0  # with mesh.pipeline > 1; 0: as many as stages
  c.train.pipeline_repeats = 1       # > 1: circular (interleaved) schedule
  c.train.max_steps = 100
  c.train.val_check_interval = 25
  c.train.save_interval = 50
  c.train.keep_last = 2
  c.train.keep_best = 1
  c.train.max_time_s = 0.0
  c.train.log_every = 10
  c.train.resume = True
  c.train.wandb_project = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-5
  c.optimizer.min_lr = config_dict.placeholder(float)  # None: lr / 10
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.warmup_steps = 10
  c.optimizer.constant_steps = 0
  c.optimizer.grad_clip = 1.0
  return c


def read_saved(path: Path) -> ml_collections.ConfigDict:
  """The config a run saved (``config.json``) over today's defaults, so that keys added since the
  run was made take their default values."""
  import json
  c = base_config()
  try:
    c.update(json.loads(Path(path).read_text()))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path}: not a readable jalign config ({e})") from None
  # JSON turned the rules tables' tuples into lists.
  as_rules = lambda rules: tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  c.sharding_rules = as_rules(c.sharding_rules)
  c.ppo.generation_rules = as_rules(c.ppo.generation_rules)
  return c


def pipeline_fields(c) -> dict:
  """The model config's pipeline settings, from the mesh and ``train.pipeline_*``."""
  stages = int(c.mesh.pipeline) if int(c.mesh.pipeline) > 0 else 1
  if stages == 1:
    return {}
  return dict(pipeline_stages=stages, pipeline_microbatches=c.train.pipeline_microbatches or stages,
              pipeline_repeats=c.train.pipeline_repeats)


def data_path(spec: str) -> Path:
  """``bundled:<name>`` is a file shipped in ``jalign/assets/data``; anything else is a path."""
  if spec.startswith("bundled:"):
    return Path(str(resources.files("jalign") / "assets" / "data" / spec[len("bundled:"):]))
  return Path(spec)


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def validate(c: ml_collections.ConfigDict, *, process_count: int = 1, device_count: int = 1,
             check_files: bool = True) -> None:
  """Check every key; ``check_files=False`` (the planner) skips the existence of data and model files."""
  _require(c.algorithm in ALGORITHMS, "algorithm", f"{c.algorithm!r} is not one of {ALGORITHMS}")
  init = c.model.init
  _require(init in MODEL_INITS or init.startswith(("hf:", "gguf:", "run:")), "model.init",
           f"{init!r} is not random, smollm2, hf:<folder>, gguf:<file> or run:<folder>")
  if init.startswith("run:") and check_files:
    _require((Path(init[4:]) / "config.json").is_file(), "model.init", f"{init[4:]} is not a jalign run folder")
  if init.startswith("hf:") and check_files:
    _require(Path(init[3:]).is_dir(), "model.init", f"{init[3:]} is not a folder")
  if init.startswith("gguf:") and check_files:
    _require(Path(init[5:]).is_file(), "model.init", f"{init[5:]} is not a file")
  if init == "random":
    from jalign.models.llama import PRESETS
    _require(c.model.preset in PRESETS, "model.preset", f"{c.model.preset!r} is not one of {sorted(PRESETS)}")
  for key in ("dtype", "param_dtype"):
    _require(c.model[key] in ("float32", "bfloat16", "float16"), f"model.{key}",
             f"{c.model[key]!r} is not float32, bfloat16 or float16")
  _require(c.tokenizer in ("model", "tiny") or Path(c.tokenizer).is_dir() or not check_files, "tokenizer",
           f"{c.tokenizer!r} is not 'model', 'tiny' or a folder")
  _require(c.tokenizer != "model" or init != "random", "tokenizer",
           "a randomly initialised model has no tokenizer of its own; use 'tiny' or a folder")

  d = c.data
  formats = FORMATS[c.algorithm]
  _require(d.format in formats, "data.format", f"{d.format!r}: algorithm {c.algorithm} reads {' or '.join(formats)}")
  _require(d.over_length in ("truncate", "drop"), "data.over_length", f"{d.over_length!r} is not truncate or drop")
  if c.algorithm == "dpo":
    from jalign.algos import dpo
    _require(c.dpo.loss_type in dpo.LOSS_TYPES, "dpo.loss_type", f"{c.dpo.loss_type!r} is not one of {dpo.LOSS_TYPES}")
    _require(c.dpo.beta > 0, "dpo.beta", "must be positive")
    _require(c.dpo.preference_weight > 0 or c.dpo.sft_weight > 0, "dpo.preference_weight",
             "preference_weight and sft_weight are both 0: nothing to train")
  if c.algorithm == "kto":
    _require(c.kto.beta > 0, "kto.beta", "must be positive")
  if c.algorithm == "steerlm2":
    _require(c.steerlm2.responses >= 2, "steerlm2.responses", "must be at least 2")
  if c.algorithm == "spin":
    _require(c.spin.iterations >= 1, "spin.iterations", "must be at least 1")
    _require(c.spin.epochs > 0, "spin.epochs", "must be positive")
    _require(c.spin.rollout_batch_size >= 1, "spin.rollout_batch_size", "must be at least 1")
    _require(0 <= c.spin.max_new_tokens < d.max_seq_length, "spin.max_new_tokens",
             f"{c.spin.max_new_tokens} leaves no room for a prompt in data.max_seq_length {d.max_seq_length}")
    _require(c.spin.greedy or c.spin.temperature > 0, "spin.temperature", "must be positive (or spin.greedy)")
    _require(c.dpo.beta > 0, "dpo.beta", "must be positive")
  if c.algorithm in ("reinforce", "rs"):
    r = c.reinforce
    _require(r.reward_model.startswith("run:"), "reinforce.reward_model",
             f"{r.reward_model!r}: name a reward model run, run:<folder>")
    if check_files:
      _require((Path(r.reward_model[4:]) / "config.json").is_file(), "reinforce.reward_model",
               f"{r.reward_model[4:]} is not a jalign run folder")
    _require(r.num_rollouts_per_prompt >= 2, "reinforce.num_rollouts_per_prompt",
             "must be at least 2 (the baseline, or the choice, is among a prompt's samples)")
    kept = r.num_rollouts_per_prompt
    if c.algorithm == "rs":
      kept = c.rs.top_n_rollouts
      _require(1 <= kept <= r.num_rollouts_per_prompt, "rs.top_n_rollouts",
               f"{kept} is not within 1..reinforce.num_rollouts_per_prompt {r.num_rollouts_per_prompt}")
    _require(r.num_rollout_samples * kept % c.train.global_batch_size == 0,
             "reinforce.num_rollout_samples", f"{r.num_rollout_samples} x {kept} samples to train on do not "
             f"split into global batches of {c.train.global_batch_size}")
    _require(0 <= r.max_new_tokens < d.max_seq_length and 0 <= r.min_new_tokens <= (r.max_new_tokens or
             d.max_seq_length // 2), "reinforce.max_new_tokens",
             f"need 0 <= min_new_tokens <= max_new_tokens < data.max_seq_length {d.max_seq_length}")
    _require(r.temperature > 0, "reinforce.temperature", "must be positive")
  if c.algorithm == "ppo":
    p = c.ppo
    for key, size in (("train.global_batch_size", c.train.global_batch_size),
                      ("critic.global_batch_size", c.critic.global_batch_size)):
      _require(p.num_rollout_samples % size == 0, "ppo.num_rollout_samples",
               f"{p.num_rollout_samples} samples do not split into global batches of {key} {size}")
    _require(p.rollout_micro_batch_size >= 1, "ppo.rollout_micro_batch_size", "must be at least 1")
    _require(p.temperature > 0, "ppo.temperature", "must be positive")
    _require(0 <= p.min_new_tokens <= p.max_new_tokens, "ppo.min_new_tokens",
             f"{p.min_new_tokens} is not within 0..ppo.max_new_tokens {p.max_new_tokens}")
    _require(p.max_new_tokens >= 1, "ppo.max_new_tokens", "must be at least 1")
    _require(p.max_new_tokens < d.max_seq_length, "ppo.max_new_tokens",
             f"{p.max_new_tokens} leaves no room for a prompt in data.max_seq_length {d.max_seq_length}")
    for key in ("init", "reward_model"):
      value = c.critic[key]
      _require(value == "random" or value.startswith("run:"), f"critic.{key}",
               f"{value!r} is not random or run:<folder>")
      if value.startswith("run:") and check_files:
        _require((Path(value[4:]) / "config.json").is_file(), f"critic.{key}",
                 f"{value[4:]} is not a jalign run folder")
  if c.algorithm == "kd":
    _require(bool(c.kd.teacher), "kd.teacher", "name the teacher model (run:<folder>, hf:<folder>, ...)")
    _require(c.kd.kind in ("fwd_kl", "bwd_kl"), "kd.kind", f"{c.kd.kind!r} is not fwd_kl or bwd_kl")
    _require(c.kd.top_k >= 1, "kd.top_k", "must be at least 1")
    _require(c.kd.kd_weight > 0 or c.kd.sft_weight > 0, "kd.kd_weight", "kd_weight and sft_weight are both 0")
  if c.lora.rank:
    from jalign.models import lora
    _require(c.lora.rank > 0, "lora.rank", f"{c.lora.rank} must be positive (0 turns LoRA off)")
    try:
      lora.resolve_targets(c.lora.targets.split(","))
    except ValueError as e:
      raise ConfigError(f"config.lora.targets: {e}") from None
  if c.algorithm == "rm":
    from jalign.algos import rm
    _require(c.rm.kind in rm.BT_KINDS, "rm.kind", f"{c.rm.kind!r} is not one of {rm.BT_KINDS}")
    _require(c.rm.num_attributes >= 1, "rm.num_attributes", "must be at least 1")
  _require(not check_files or data_path(d.train).is_file(), "data.train", f"{data_path(d.train)} not found")
  if d.validation and check_files:
    _require(data_path(d.validation).is_file(), "data.validation", f"{data_path(d.validation)} not found")
  _require(d.max_seq_length >= 8, "data.max_seq_length", f"{d.max_seq_length} is too short")
  _require(d.pad_to_multiple_of >= 0, "data.pad_to_multiple_of", "must be >= 0")
  _require(d.truncation in ("right", "left"), "data.truncation", f"{d.truncation!r} is not right or left")
  _require(d.chat_prompt_tokens in ("default", "extra_id"), "data.chat_prompt_tokens",
           f"{d.chat_prompt_tokens!r} is not default or extra_id")
  _require(d.chat_template in ("nemo", "model"), "data.chat_template", f"{d.chat_template!r} is not nemo or model")
  _require(d.chat_template == "nemo" or d.format in ("comparison", "kto"), "data.chat_template",
           f"'model' renders the message prompts of comparison and kto data; {d.format} data uses NeMo's chat format")
  _require("{input}" in d.prompt_template and "{output}" in d.prompt_template, "data.prompt_template",
           "must contain {input} and {output}")

  try:
    shape = mesh_shape(dict(c.mesh), device_count)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  rule_names = {r[0] for r in c.sharding_rules}
  _require("batch" in rule_names, "sharding_rules", "needs a rule for 'batch'")
  for logical, axes in c.sharding_rules:
    for a in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      _require(a is None or a in shape, "sharding_rules", f"rule {logical!r} names unknown mesh axis {a!r}")
  from jalign.parallel.logical import logical_to_spec
  rows = logical_to_spec(("batch",), tuple(c.sharding_rules))[0]
  dp = 1
  for a in (() if rows is None else rows if isinstance(rows, tuple) else (rows,)):
    dp *= shape[a]

  t = c.train
  _require(t.max_steps >= 1, "train.max_steps", "must be at least 1")
  _require(t.global_batch_size % process_count == 0, "train.global_batch_size",
           f"{t.global_batch_size} does not split over {process_count} processes")
  _require(t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0,
           "train.micro_batch_size", f"{t.micro_batch_size} rows on each of {dp} data-parallel ranks do not "
           f"divide the global batch of {t.global_batch_size}")
  if shape["pipeline"] > 1:
    pipe_micro = t.pipeline_microbatches or shape["pipeline"]
    rows = t.micro_batch_size * dp
    _require(rows % pipe_micro == 0, "train.pipeline_microbatches",
             f"{pipe_micro} pipeline micro-batches do not divide the {rows} rows of a micro-batch")
  _require(t.keep_last >= 1, "train.keep_last", "must be at least 1")
  for key in ("val_check_interval", "save_interval"):
    _require(t[key] >= 0, f"train.{key}", "must be >= 0")
  if t.save_interval and t.val_check_interval and t.keep_best:
    _require(t.save_interval % t.val_check_interval == 0, "train.save_interval",
             f"{t.save_interval} must be a multiple of val_check_interval {t.val_check_interval} "
             "so that every checkpoint has a validation loss to rank it by")

  o = c.optimizer
  _require(o.lr > 0, "optimizer.lr", "must be positive")
  _require(o.min_lr is None or 0 <= o.min_lr <= o.lr, "optimizer.min_lr", "must be within [0, lr]")
  _require(o.warmup_steps >= 0 and o.constant_steps >= 0, "optimizer.warmup_steps",
           "warmup_steps and constant_steps must be >= 0")
