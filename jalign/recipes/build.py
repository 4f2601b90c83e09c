"""The builders every recipe shares: the run folder, model, tokenizer, data, optimizer, train step and
trainer of a config, and a trained run folder loaded back. What is specific to an algorithm comes from
its spec (``jalign.specs``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jalign import config as config_lib
from jalign import metrics as metrics_lib
from jalign import optim, run_folder, specs, trainer
from jalign.data import formats, pipeline
from jalign.data.tokenizer import Tokenizer
from jalign.models import LlamaConfig, Transformer, gguf, hf, lora
from jalign.models.pretrained import load_smollm2, smollm2_path
from jalign.parallel import mesh as pmesh
from jalign.specs.base import ConfigError


def prepare_run(c):
  """``(mesh, rules, run folder)`` of a config about to run: validated for this job's processes and
  devices and its folder made. The config is checked against the folder's checkpoints once its data
  has been read and saved there when training starts (``run_folder``)."""
  config_lib.validate(c, process_count=jax.process_count(), device_count=jax.device_count())
  config_lib.require_training_start(c)
  mesh = pmesh.make_mesh(dict(c.mesh))
  run_dir = Path(c.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  return mesh, rules_of(c), run_dir


def rules_of(c) -> tuple:
  return tuple(tuple(r) for r in c.sharding_rules)


def tool_mesh():
  """The mesh of a command that reads a trained run to use it (scoring, labelling, export): every
  device of this process, the parameters sharded over all of them (fsdp) and the rows split so."""
  return pmesh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "pipeline": 1}, devices=jax.local_devices())


def _model_kwargs(c) -> dict:
  m = c.model
  return dict(dtype=m.param_dtype, compute_dtype=m.dtype, remat=m.remat, **config_lib.pipeline_fields(c))


def model_config(c) -> LlamaConfig:
  """The ``LlamaConfig`` of ``config.model``, read without loading any weights."""
  m = c.model
  kwargs = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **config_lib.pipeline_fields(c))
  if m.init == "random":
    return LlamaConfig.preset(m.preset, **kwargs)
  if m.init.startswith("run:"):
    return run_model_config(m.init[4:]).replace(**kwargs)
  if m.init.startswith("hf:"):
    return hf.config_from_hf(hf.read_config_file(Path(m.init[3:])), Path(m.init[3:]) / "config.json", **kwargs)
  path = smollm2_path() if m.init == "smollm2" else Path(m.init[5:])
  return gguf.config_from_gguf(gguf.open_reader(path)[0], path, **kwargs)


def run_model_config(run_dir: str) -> LlamaConfig:
  """The model config of a jalign run folder, from the config it saved."""
  return model_config(read_run_config(run_dir))


def read_run_config(run_dir):
  config_file = Path(run_dir) / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file}: not a jalign run folder (no config.json)")
  return config_lib.read_saved(config_file)


def build_model(c, mesh=None, rules=None):
  """``(model, tokenizer or None)`` from ``config.model``; with ``mesh``, every parameter is created or
  read straight into its sharding by ``rules`` (default: the config's), never whole on one device."""
  m = c.model
  rules = rules_of(c) if rules is None else rules
  if m.init == "random":
    cfg = model_config(c)
    return pmesh.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(c.seed)), mesh, rules), None
  if m.init.startswith("run:"):  # a model trained by jalign (e.g. SFT before DPO, or a KD teacher)
    model, tok, _ = load_trained(m.init[4:], mesh=mesh, rules=rules)
    return (lora.merge_lora(model) if lora.has_lora(model) else model), tok
  with pmesh.use(mesh, rules):  # the readers place each tensor by the rules active here
    if m.init == "smollm2":
      return load_smollm2(mesh=mesh, **_model_kwargs(c))
    if m.init.startswith("gguf:"):
      return gguf.load(m.init[5:], mesh=mesh, **_model_kwargs(c))
    folder = m.init[3:]
    return hf.load(folder, mesh=mesh, **_model_kwargs(c)), own_tokenizer(c)


def own_tokenizer(c) -> Tokenizer | None:
  """The tokenizer that ``config.model``'s checkpoint ships (None: a random model, or a Hugging Face
  folder without ``tokenizer.json``), read without its weights."""
  m = c.model
  if m.init == "random":
    return None
  if m.init.startswith("run:"):
    saved = read_run_config(m.init[4:])
    return build_tokenizer(saved, own_tokenizer(saved))
  if m.init.startswith("hf:"):
    folder = Path(m.init[3:])
    return Tokenizer.from_dir(folder) if (folder / "tokenizer.json").is_file() else None
  path = smollm2_path() if m.init == "smollm2" else Path(m.init[5:])
  return gguf.tokenizer_from_gguf(*gguf.open_reader(path))


def build_tokenizer(c, own: Tokenizer | None) -> Tokenizer:
  if c.tokenizer == "tiny":
    return Tokenizer.tiny()
  if c.tokenizer == "model":
    if own is None:
      raise ConfigError(f"config.tokenizer: {c.model.init} has no tokenizer; name a folder")
    return own
  return Tokenizer.from_dir(c.tokenizer)


def load_examples(c, tok: Tokenizer, spec: str, log, *, encode=None):
  """The training examples of one jsonl file, encoded by the algorithm's spec (or ``encode``), with
  the counts of what was cut."""
  d = c.data
  path = config_lib.data_path(spec)
  records, report = formats.read_jsonl(path, d.format, skip_bad_lines=d.skip_bad_lines)
  examples, stats = (encode or specs.get(c.algorithm).encode)(c, tok, records, path)
  log(f"{path}: {report.records} records, {report.bad_lines} bad lines skipped, "
      f"{stats.truncated} truncated, {stats.dropped} dropped, {stats.tokens} tokens")
  return examples, {"bad_lines": report.bad_lines, **stats.as_dict()}


def build_data(c, tok: Tokenizer, pad_id: int, log):
  """``(train_batches, val_batches or None, train_stats)``: the data files as rows of the algorithm's
  batches (packed SFT rows, rows of pairs, ...)."""
  spec = specs.get(c.algorithm)
  d, t = c.data, c.train
  train_examples, train_stats = load_examples(c, tok, d.train, log)
  val_examples = load_examples(c, tok, d.validation, log)[0] if d.validation else None
  train_rows = spec.plan(c, train_examples)
  val_rows = spec.plan(c, val_examples) if val_examples is not None else []
  make_row, length = spec.row(c, max((len(r) for r in train_rows + val_rows), default=1))
  kwargs = dict(pad_id=pad_id, batch_size=t.global_batch_size, pad_to_multiple_of=d.pad_to_multiple_of,
                make_row=make_row, length=length)
  train_batches = pipeline.batches(train_rows, train_examples, seed=c.seed, shuffle=d.shuffle, **kwargs)
  val_batches = None
  if val_examples is not None:
    val_batches = lambda: pipeline.row_dataset(val_rows, val_examples, seed=0, shuffle=False, num_epochs=1,
                                               pad_last_batch=True, **kwargs)
  return train_batches, val_batches, train_stats


def abstract_row(c) -> tuple[dict, int]:
  """``(row, length)``: an empty row of the algorithm's batches, for shapes."""
  make_row, length = specs.get(c.algorithm).row(c, 1)
  return make_row([], length, 0), length


def algorithm_parts(c, model, mesh=None, rules=None):
  """``(model, loss_fn, reference_fn or None)`` of the algorithm's spec (a reward model puts a value
  head on the model); ``config.lora`` adds adapters (``trainable_filter`` says what then trains). With
  ``mesh``, what they add is placed by ``rules`` beside the parameters already there."""
  parts = specs.get(c.algorithm).parts
  # A rollout algorithm's policy is the model as it is (its losses come with its rollouts).
  model, loss_fn, reference_fn = parts(c, model) if parts is not None else (model, None, None)
  add_adapters(c, model)
  if mesh is not None:
    rules = rules_of(c) if rules is None else rules
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, pmesh.place(state, pmesh.tree_shardings(state, mesh, rules)))
  return model, loss_fn, reference_fn


def add_adapters(c, model):
  """``config.lora``'s adapters added to ``model`` in place (none when ``lora.rank`` is 0); ``model``."""
  if c.lora.rank:
    lora.add_lora(model, targets=c.lora.targets.split(","), rank=c.lora.rank, alpha=c.lora.alpha or None,
                  rngs=nnx.Rngs(c.seed + 1))
  return model


def trainable_filter(c):
  """What the optimizer trains: LoRA adapters (and what the spec adds, a reward model's new head)
  when ``config.lora.rank`` > 0, else every parameter."""
  if not c.lora.rank:
    return nnx.Param
  also = specs.get(c.algorithm).lora_also_trains
  return lora.LoRAParam if also is None else nnx.Any(lora.LoRAParam, also)


def build_optimizer(c, *, max_steps: int | None = None, lr: float | None = None, min_lr: float | None = None,
                    weight_decay: float | None = None):
  """``(schedule, optax transformation)`` of ``config.optimizer`` over ``train.max_steps``; the critic
  overrides its rate, floor, decay and length. The schedule goes into the train state (``init_state``),
  whose step hands it to the transformation."""
  o = c.optimizer
  schedule = optim.nemo_schedule(o.lr if lr is None else lr, max_steps=max_steps or c.train.max_steps,
                                 warmup_steps=o.warmup_steps, constant_steps=o.constant_steps,
                                 min_lr=o.min_lr if min_lr is None else min_lr)
  return schedule, optim.adamw(b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay if weight_decay is None else weight_decay,
                               grad_clip=o.grad_clip or None)


def micro_batches(global_batch_size: int, micro_batch_size: int, mesh, rules) -> int:
  """Micro-batches of one global batch: ``micro_batch_size`` rows on each data-parallel rank."""
  return global_batch_size // (micro_batch_size * pmesh.data_parallel_size(mesh, rules))


def train_step(c, graphdef, loss_fn, tx, mesh, rules):
  """The pure train step of the policy a config trains."""
  micro = micro_batches(c.train.global_batch_size, c.train.micro_batch_size, mesh, rules)
  return trainer.make_train_step(graphdef, loss_fn, tx, micro_batches=micro)


def reference_pass(c, graphdef, state, reference_fn, mesh, rules) -> trainer.ReferencePass:
  """The frozen starting policy's pass (DPO's reference log-probs, the KL's initial policy)."""
  return trainer.ReferencePass(graphdef, state, reference_fn, mesh=mesh, rules=rules, offload=c.reference.offload,
                               reference_params=lora.without_adapters if c.lora.rank else None,
                               micro_batches=micro_batches(c.train.global_batch_size, c.train.micro_batch_size,
                                                           mesh, rules))


def build_trainer(c, log=print, *, model=None, tokenizer: Tokenizer | None = None) -> trainer.Trainer:
  """Everything a config describes, ready to ``run()``: model, data, step, checkpoints. A ``model``
  (and its ``tokenizer``) already in memory, such as SPIN's previous iteration, replaces building
  ``config.model``'s."""
  if specs.get(c.algorithm).recipe != "train":
    raise ConfigError(f"config.algorithm: {c.algorithm} generates its own data; jalign.train.run "
                      f"(or jalign.recipes.{specs.get(c.algorithm).recipe}.run) runs it")
  mesh, rules, run_dir = prepare_run(c)
  model, own = (model, tokenizer) if model is not None else build_model(c, mesh, rules)
  tok = tokenizer or build_tokenizer(c, own)
  if tok.vocab_size > model.config.vocab_size:
    raise ConfigError(f"config.tokenizer: {tok.vocab_size} tokens, more than the model's "
                      f"vocabulary of {model.config.vocab_size}")
  pad_id = tok.pad_id if tok.pad_id is not None else 0
  t = c.train
  train_batches, val_batches, train_stats = build_data(c, tok, pad_id, log)
  run_folder.check_config(c)
  (run_dir / "data_stats.json").write_text(json.dumps(train_stats, indent=2))
  lm_config = model.config
  model, loss_fn, reference_fn = algorithm_parts(c, model, mesh, rules)

  schedule, tx = build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=trainable_filter(c), schedule=schedule,
                                       mesh=mesh, rules=rules)
  log(f"training {trainer.count(state.params):,} of {trainer.count(state.params) + trainer.count(state.rest):,} "
      "parameters")
  reference = None
  if reference_fn is not None:
    reference = reference_pass(c, graphdef, state, reference_fn, mesh, rules)
  options = trainer.TrainerOptions(
      max_steps=t.max_steps, val_check_interval=t.val_check_interval if val_batches else 0,
      save_interval=t.save_interval, keep_last=t.keep_last, keep_best=t.keep_best if val_batches else 0,
      max_time_s=t.max_time_s, log_every=t.log_every, resume=t.resume,
      skip_unreadable_checkpoints=t.skip_unreadable_checkpoints,
      flops_per_token=metrics_lib.train_flops_per_token(lm_config, c.data.max_seq_length),
      monitor="val_loss")
  return trainer.Trainer(state=state, train_step=train_step(c, graphdef, loss_fn, tx, mesh, rules),
                         eval_step=trainer.make_eval_step(graphdef, loss_fn), train_batches=train_batches,
                         val_batches=val_batches, run_dir=run_dir, options=options, mesh=mesh, rules=rules,
                         wandb_project=t.wandb_project or None, config=c.to_dict(), graphdef=graphdef,
                         reference=reference, on_start=functools.partial(run_folder.record_config, c, log=log))


def load_trained(run_dir: str | Path, step: int | None = None, *, mesh=None, rules=None, model: dict | None = None):
  """``(model, tokenizer, config)`` of a training run folder: its saved config rebuilt, the trained
  parameters of checkpoint ``step`` (default: the latest) restored, with ``mesh`` straight into their
  shardings by ``rules`` (default: the run's). Only the parameters are read, not the optimizer state;
  the weights the run started from are loaded only when they stayed frozen (LoRA's base). ``model``:
  ``config.model`` keys to read it with in place of the run's (``param_dtype``, ``dtype``, ``remat``),
  such as the compute dtype for a model that only scores."""
  run_dir = Path(run_dir)
  saved = c = read_run_config(run_dir)
  if model:
    c = c.copy_and_resolve_references()
    c.model.update(model)
  rules = rules_of(c) if rules is None else rules
  manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to load")
  tok = build_tokenizer(c, own_tokenizer(c))
  if c.lora.rank:
    model = algorithm_parts(c, build_model(c, mesh, rules)[0], mesh, rules)[0]
  else:  # every parameter comes from the checkpoint: only shapes are needed
    cfg = model_config(c)
    model = nnx.eval_shape(lambda: algorithm_parts(c, Transformer(cfg, rngs=nnx.Rngs(0)))[0])
  graphdef, params, rest = nnx.split(model, trainable_filter(c), ...)
  if mesh is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), params)
  else:
    shardings = pmesh.tree_shardings(params, mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  item = {"params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  return nnx.merge(graphdef, restored.state["params"], rest, copy=True), tok, saved
