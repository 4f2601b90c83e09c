"""The base ml_collections config every ``configs/*.py`` file starts from, and its validation.

The generic blocks (model, data, train, optimizer, mesh, LoRA, ...) are here; each algorithm's own
block (``dpo``, ``ppo``, ``critic``, ...) comes from its spec in ``jalign.specs``. ``validate(config)``
runs before anything is built or compiled; its errors name the key, e.g.
``config.train.micro_batch_size: 6 does not divide the per-process batch of 16``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from importlib import resources
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from jalign import specs
from jalign.models import lora
from jalign.models.llama import PRESETS
from jalign.parallel.logical import logical_to_spec
from jalign.parallel.mesh import DEFAULT_RULES, mesh_shape
from jalign.specs.base import ConfigError, require

ALGORITHMS = specs.ALGORITHMS
MODEL_INITS = ("random", "smollm2")  # or "hf:<folder>", "gguf:<file>", "run:<jalign run folder>"
DTYPES = ("float32", "bfloat16", "float16")
Block = ml_collections.ConfigDict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.run_dir = "runs/run"
  c.seed = 0
  c.model = Block(dict(
      init="random",          # random | smollm2 | hf:<folder> | gguf:<file> | run:<jalign run folder>
      preset="tiny",          # LlamaConfig.preset name, for init=random
      dtype="float32",        # compute dtype (bfloat16 with float32 master weights is the GPU norm)
      param_dtype="float32",
      remat="none",
      allow_random=False))    # train random weights of a preset larger than tiny (benchmarks do)
  c.tokenizer = "model"       # model (the checkpoint's own) | tiny | <folder with tokenizer.json>
  c.data = _data_block()
  # LoRA (rank 0: off): only the adapters train and are saved; the DPO reference is the base model with
  # the adapters off. NeMo's defaults: rank (adapter_dim) 32, alpha = rank, targets attention_qkv.
  c.lora = Block(dict(
      rank=0,
      alpha=0.0,              # 0: alpha = rank (scale 1)
      targets="attention_qkv"))  # comma-separated: q,k,v,o,gate,up,down or NeMo's names (attention, mlp, all, ...)
  # The reference policy (dpo, kto) or initial policy (the KL of rollouts): a frozen copy of the
  # starting weights; offload keeps it in host memory between passes.
  c.reference = Block(dict(offload=False))
  # How the algorithms that generate (reinforce, rs, ppo, spin) sample. A key left None takes the same
  # setting from the algorithm's own block (reinforce.num_rollout_samples, ppo.temperature, ...), which
  # configs written before this block set; setting both to different values is an error.
  c.rollout = Block(dict(
      num_prompts=config_dict.placeholder(int),         # prompts per rollout
      samples_per_prompt=config_dict.placeholder(int),  # responses sampled for each (PPO, SPIN: 1)
      micro_batch_size=config_dict.placeholder(int),    # sequences generated at once per data-parallel rank
      max_new_tokens=config_dict.placeholder(int), min_new_tokens=config_dict.placeholder(int),
      temperature=config_dict.placeholder(float), top_k=config_dict.placeholder(int),
      top_p=config_dict.placeholder(float),
      # reinforce and ppo: weight each token of the policy loss by min(pi_old / pi_engine, tis_cap), the
      # trainer's over the engine's probability of the sampled token (truncated importance sampling);
      # 0: off. The gap itself is logged with every rollout (logprob_gap_*).
      tis_cap=0.0,
      # Continuous batching: micro_batch_size rows per data-parallel rank decode together and a row that
      # stops takes the next prompt at once, instead of every batch waiting for its longest reply. The
      # samples are the same either way.
      continuous_batching=False,
      # A rollout's rows are padded to the smallest multiple of this that holds its longest sample (at
      # most data.max_seq_length), so that its log-prob, value and train passes cost what its replies
      # do; 0: always data.max_seq_length.
      pad_to_multiple=256,
      # Where the samples come from (jalign.rollout.engine): local (the decode loop in the actor's own
      # process) or served (the generation server at engine_server, a job of its own started with
      # python -m jalign.serve --config=<this config> --config.generation.serve=True, refitted with the
      # actor's weights at every rollout in buckets of refit_bucket_mb, device to device).
      engine="local",
      engine_server="",
      connect_timeout_s=600.0,  # waiting for the generation server to answer at the start
      refit_bucket_mb=512.0,
      refit_timeout_s=300.0,    # a refit that has not pulled every bucket by then fails (the old weights serve on)
      # 1 (served engine): rollout k+1 generates while the actor trains on rollout k, with the weights of
      # rollout k's start; the policy loss's importance ratio divides by the engine's log-probs (the
      # behaviour policy). 0: each rollout generates with the weights that then train on it.
      max_staleness=0))
  # python -m jalign.serve with generation.serve: config.model (the policy, with the config's tokenizer)
  # served for generation (jalign.serve.generation), on a ppo config's critic server, else at serve_address.
  # The default address leaves 5556-5558 (HTTP, gRPC, metrics) to the critic server's default.
  c.generation = Block(dict(serve=False, serve_address="127.0.0.1:5560",
                            max_request_rows=1024))  # larger requests are refused
  # Mesh axis sizes (-1: fill with the remaining devices) and the logical-axis rules table.
  c.mesh = Block({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = DEFAULT_RULES
  # Multi-host: empty values are found from the environment (Slurm, Open MPI) when there is one.
  c.distributed = Block(dict(
      coordinator_address="", num_processes=0, process_id=-1,
      local_device_count=0))  # CPU only: devices per process
  c.train = Block(dict(
      global_batch_size=16,
      micro_batch_size=8,     # rows per micro-batch on each data-parallel rank (NeMo's meaning)
      pipeline_microbatches=0,  # with mesh.pipeline > 1; 0: as many as stages
      pipeline_repeats=1,     # > 1: circular (interleaved) schedule
      max_steps=100, val_check_interval=25, save_interval=50, keep_last=2, keep_best=1, max_time_s=0.0,
      log_every=10, resume=True, wandb_project="",
      allow_config_change=False,  # resume checkpoints made by a config that computed otherwise (jalign.run_folder)
      skip_unreadable_checkpoints=False))  # resume from the newest readable checkpoint, setting aside newer ones
  c.optimizer = Block(dict(
      lr=3e-5,
      min_lr=config_dict.placeholder(float),  # None: lr / 10
      weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-8, warmup_steps=10, constant_steps=0, grad_clip=1.0))
  for spec in specs.REGISTRY.values():  # each algorithm's own blocks, with its defaults
    for name, block in spec.blocks.items():
      c[name] = block()
  return c


def _data_block() -> ml_collections.ConfigDict:
  return Block(dict(
      format="chat",          # chat | prompt_response (the formats an algorithm reads: its spec's)
      train="bundled:sft_chat_train.jsonl",
      validation="bundled:sft_chat_val.jsonl",  # "" for none
      max_seq_length=256,
      pack=True,
      pad_to_multiple_of=0,   # 0: every batch is max_seq_length wide; N: cut to the longest row, rounded up to N
      shuffle=True,
      prompt_template="{input} {output}",
      truncation="right",     # which end of the prompt is cut when an example is too long
      add_bos=False,
      add_eos=True,
      chat_prompt_tokens="default",  # default (\x00 \x11 \x12) | extra_id (<extra_id_N>)
      chat_template="nemo",   # message prompts of comparison/kto data: nemo (NeMo's chat format with
                              # chat_prompt_tokens) | model (the tokenizer's own jinja chat template)
      skip_bad_lines=False,
      over_length="truncate"))  # pairs too long: truncate the prompt's left end (drop if the response alone
                                # does not fit) | drop (drop the pair); both counted in data_stats.json


def read_saved(path: Path) -> ml_collections.ConfigDict:
  """The config a run saved (``config.json``) over today's defaults, so that keys added since the
  run was made take their default values."""
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


def value_at(c, key: str):
  """The value of dotted ``key`` (``"critic.reward_model"``) in config ``c``."""
  for part in key.split("."):
    c = c[part]
  return c


def load_config_file(path: str | Path, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, with dotted-key overrides (``{"train.max_steps": 10}``)."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"{path}: config file not found")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in (overrides or {}).items():
    parent = c
    *head, last = key.split(".")
    for part in head:
      parent = parent[part]
    if last not in parent:
      raise ConfigError(f"config.{key}: no such key in {path}")
    parent[last] = value
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


def validate(c: ml_collections.ConfigDict, *, process_count: int = 1, device_count: int = 1,
             check_files: bool = True) -> None:
  """Check every key; ``check_files=False`` (the planner) skips the existence of data and model files."""
  spec = specs.get(c.algorithm)
  _validate_model(c, check_files)
  d = c.data
  require(d.format in spec.formats, "data.format",
          f"{d.format!r}: algorithm {c.algorithm} reads {' or '.join(spec.formats)}")
  require(d.over_length in ("truncate", "drop"), "data.over_length", f"{d.over_length!r} is not truncate or drop")
  spec.validate(c, check_files)
  if c.lora.rank:
    require(c.lora.rank > 0, "lora.rank", f"{c.lora.rank} must be positive (0 turns LoRA off)")
    try:
      lora.resolve_targets(c.lora.targets.split(","))
    except ValueError as e:
      raise ConfigError(f"config.lora.targets: {e}") from None
  _validate_data(c, check_files)
  _validate_engine(c.rollout)
  dp, shape = _validate_mesh(c, device_count)
  _validate_train(c, dp, shape, process_count)
  o = c.optimizer
  require(o.lr > 0, "optimizer.lr", "must be positive")
  require(o.min_lr is None or 0 <= o.min_lr <= o.lr, "optimizer.min_lr", "must be within [0, lr]")
  require(o.warmup_steps >= 0 and o.constant_steps >= 0, "optimizer.warmup_steps",
          "warmup_steps and constant_steps must be >= 0")


def _validate_engine(r) -> None:
  require(r.engine != "served" or bool(r.engine_server), "rollout.engine_server",
          "the served engine needs the generation server's host:port")
  require(r.max_staleness in (0, 1), "rollout.max_staleness", f"{r.max_staleness} is not 0 or 1")
  require(not r.max_staleness or r.engine == "served", "rollout.max_staleness",
          "generating the next rollout while the actor trains needs rollout.engine='served'")
  for key in ("refit_bucket_mb", "refit_timeout_s", "connect_timeout_s"):
    require(r[key] > 0, f"rollout.{key}", f"{r[key]} must be positive")


def _validate_model(c, check_files: bool) -> None:
  init = c.model.init
  require(init in MODEL_INITS or init.startswith(("hf:", "gguf:", "run:")), "model.init",
          f"{init!r} is not random, smollm2, hf:<folder>, gguf:<file> or run:<folder>")
  if check_files:
    require(not init.startswith("run:") or (Path(init[4:]) / "config.json").is_file(), "model.init",
            f"{init[4:]} is not a jalign run folder")
    if init.startswith("hf:"):
      folder = Path(init[3:])
      require(folder.is_dir(), "model.init", f"{init[3:]} is not a folder")
      require((folder / "config.json").is_file(), "model.init",
              f"{init[3:] or repr('')} holds no config.json: not a Hugging Face model folder")
      _require_json(folder / "config.json")
    require(not init.startswith("gguf:") or Path(init[5:]).is_file(), "model.init", f"{init[5:]} is not a file")
  if init == "random":
    require(c.model.preset in PRESETS, "model.preset", f"{c.model.preset!r} is not one of {sorted(PRESETS)}")
  for key in ("dtype", "param_dtype"):
    require(c.model[key] in DTYPES, f"model.{key}", f"{c.model[key]!r} is not float32, bfloat16 or float16")
  require(c.tokenizer in ("model", "tiny") or Path(c.tokenizer).is_dir() or not check_files, "tokenizer",
          f"{c.tokenizer!r} is not 'model', 'tiny' or a folder")


def _require_json(path: Path) -> None:
  try:
    json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None


def require_training_start(c) -> None:
  """A training run starts from trained weights: random ones only for the tiny preset, or when
  ``model.allow_random`` says so (benchmarks). The planner plans either."""
  m = c.model
  require(m.init != "random" or m.preset == "tiny" or m.allow_random, "model.init",
          f"random weights of the {m.preset} preset: name the checkpoint to train (hf:<folder>, gguf:<file>, "
          "run:<folder>), or set model.allow_random=True to train random weights (benchmarks)")
  require(c.tokenizer != "model" or m.init != "random", "tokenizer",
          "a randomly initialised model has no tokenizer of its own; use 'tiny' or a folder")


def _validate_data(c, check_files: bool) -> None:
  d = c.data
  require(not check_files or data_path(d.train).is_file(), "data.train", f"{data_path(d.train)} not found")
  if d.validation and check_files:
    require(data_path(d.validation).is_file(), "data.validation", f"{data_path(d.validation)} not found")
  require(d.max_seq_length >= 8, "data.max_seq_length", f"{d.max_seq_length} is too short")
  require(d.pad_to_multiple_of >= 0, "data.pad_to_multiple_of", "must be >= 0")
  require(d.truncation in ("right", "left"), "data.truncation", f"{d.truncation!r} is not right or left")
  require(d.chat_prompt_tokens in ("default", "extra_id"), "data.chat_prompt_tokens",
          f"{d.chat_prompt_tokens!r} is not default or extra_id")
  require(d.chat_template in ("nemo", "model"), "data.chat_template", f"{d.chat_template!r} is not nemo or model")
  require(d.chat_template == "nemo" or d.format in ("comparison", "kto", "problem"), "data.chat_template",
          f"'model' renders the message prompts of comparison, kto and problem data; {d.format} data uses "
          "NeMo's chat format")
  require("{input}" in d.prompt_template and "{output}" in d.prompt_template, "data.prompt_template",
          "must contain {input} and {output}")


def nominal_device_count(sizes) -> int:
  """The devices a mesh's fixed axis sizes name (a -1 axis counted as 1)."""
  return math.prod(max(1, int(n)) for n in dict(sizes).values())


def require_mesh_fits(c, key: str, device_count: int) -> dict:
  """The axis sizes of the mesh at ``key`` (``mesh``, ``critic.mesh``), checked to split the
  ``device_count`` devices of the job that runs it."""
  try:
    return mesh_shape(dict(value_at(c, key)), device_count)
  except ValueError as e:
    raise ConfigError(f"config.{key}: {e}") from None


def _validate_mesh(c, device_count: int) -> tuple[int, dict]:
  """``(data-parallel ranks, mesh axis sizes)`` of a valid mesh and rules table."""
  shape = require_mesh_fits(c, "mesh", device_count)
  require("batch" in {r[0] for r in c.sharding_rules}, "sharding_rules", "needs a rule for 'batch'")
  for logical, axes in c.sharding_rules:
    for a in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      require(a is None or a in shape, "sharding_rules", f"rule {logical!r} names unknown mesh axis {a!r}")
  rows = logical_to_spec(("batch",), tuple(c.sharding_rules))[0]
  dp = 1
  for a in (() if rows is None else rows if isinstance(rows, tuple) else (rows,)):
    dp *= shape[a]
  return dp, shape


def _validate_train(c, dp: int, shape: dict, process_count: int) -> None:
  t = c.train
  require(t.max_steps >= 1, "train.max_steps", "must be at least 1")
  require(t.global_batch_size >= 1, "train.global_batch_size", "must be at least 1")
  require(t.global_batch_size % process_count == 0, "train.global_batch_size",
          f"{t.global_batch_size} does not split over {process_count} processes")
  require(t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0,
          "train.micro_batch_size", f"{t.micro_batch_size} rows on each of {dp} data-parallel ranks do not "
          f"divide the global batch of {t.global_batch_size}")
  if shape["pipeline"] > 1:
    pipe_micro = t.pipeline_microbatches or shape["pipeline"]
    rows = t.micro_batch_size * dp
    require(rows % pipe_micro == 0, "train.pipeline_microbatches",
            f"{pipe_micro} pipeline micro-batches do not divide the {rows} rows of a micro-batch")
  require(t.keep_last >= 1, "train.keep_last", "must be at least 1")
  for key in ("val_check_interval", "save_interval"):
    require(t[key] >= 0, f"train.{key}", "must be >= 0")
  if t.save_interval and t.val_check_interval and t.keep_best:
    require(t.save_interval % t.val_check_interval == 0, "train.save_interval",
            f"{t.save_interval} must be a multiple of val_check_interval {t.val_check_interval} "
            "so that every checkpoint has a validation loss to rank it by")
