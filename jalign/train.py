"""``python -m jalign.train --config=configs/<name>.py [--config.<key>=<value> ...]``.

Reads the config, validates it, builds the model, data and step for its ``algorithm``, and runs the
loop. The resolved config is saved as ``config.json`` in the run folder.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from jalign import config as config_lib
from jalign import distill, optim, trainer
from jalign.algos import dpo, kd, kto, rm, sft, steerlm2
from jalign.data import distillation, formats, packing, pipeline, preference
from jalign.data.chat import ModelChatTemplate, NemoChatFormat
from jalign.data.prompts import encode_regression, regression_rows
from jalign.data.sft import encode_records
from jalign.data.tokenizer import Tokenizer
from jalign.models import LlamaConfig, Transformer, lora
from jalign.models.heads import ValueModel
from jalign.parallel import distributed
from jalign.parallel import mesh as pmesh


def build_model(c):
  """``(model, tokenizer or None)`` from ``config.model``."""
  m = c.model
  kwargs = dict(dtype=m.param_dtype, compute_dtype=m.dtype, remat=m.remat, **config_lib.pipeline_fields(c))
  if m.init == "random":
    cfg = LlamaConfig.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                             **config_lib.pipeline_fields(c))
    return Transformer(cfg, rngs=nnx.Rngs(c.seed)), None
  if m.init == "smollm2":
    from jalign.models.pretrained import load_smollm2
    return load_smollm2(**kwargs)
  if m.init.startswith("gguf:"):
    from jalign.models import gguf
    return gguf.load(m.init[5:], **kwargs)
  if m.init.startswith("run:"):  # a model trained by jalign (e.g. SFT before DPO, or a KD teacher)
    model, tok, _ = load_trained(m.init[4:])
    return (lora.merge_lora(model) if lora.has_lora(model) else model), tok
  from jalign.models import hf
  folder = m.init[3:]
  return hf.load(folder, **kwargs), (Tokenizer.from_dir(folder) if (Path(folder) / "tokenizer.json").is_file() else None)


def build_tokenizer(c, own: Tokenizer | None) -> Tokenizer:
  if c.tokenizer == "tiny":
    return Tokenizer.tiny()
  if c.tokenizer == "model":
    if own is None:
      raise config_lib.ConfigError(f"config.tokenizer: {c.model.init} has no tokenizer; name a folder")
    return own
  return Tokenizer.from_dir(c.tokenizer)


def message_format(c, tok: Tokenizer | None = None):
  """How message prompts are rendered: NeMo's chat format (``data.chat_prompt_tokens``), or with
  ``data.chat_template = "model"`` the tokenizer's own template."""
  if c.data.chat_template == "model":
    if tok is None or tok.chat_template is None:
      raise config_lib.ConfigError(f"config.data.chat_template: 'model', but the tokenizer "
                                   f"{getattr(tok, 'source', '')} has no chat template")
    return ModelChatTemplate(tok)
  return NemoChatFormat.extra_id() if c.data.chat_prompt_tokens == "extra_id" else NemoChatFormat()


def load_examples(c, tok: Tokenizer, spec: str, log):
  """SFT examples, or comparison pairs for rm/dpo, of one jsonl file; with the counts of what was cut."""
  d = c.data
  path = config_lib.data_path(spec)
  records, report = formats.read_jsonl(path, d.format, skip_bad_lines=d.skip_bad_lines)
  if c.algorithm == "rm" and d.format == "regression":
    try:
      examples, stats = encode_regression(records, tok, max_length=d.max_seq_length,
                                          num_attributes=c.rm.num_attributes)
    except ValueError as e:  # a label of the wrong size: name the file and the key to change
      raise formats.DataError(f"{path}: {e} (config.rm.num_attributes)") from None
  elif c.algorithm in ("rm", "dpo"):
    examples, stats = preference.encode_pairs(records, tok, max_length=d.max_seq_length,
                                              chat_format=message_format(c, tok),
                                              add_eos=d.add_eos, over_length=d.over_length)
  elif c.algorithm == "steerlm2":
    examples, stats = preference.encode_groups(records, tok, max_length=d.max_seq_length,
                                               chat_format=message_format(c, tok), over_length=d.over_length)
    largest = max((len(g.responses) for g in examples), default=0)
    if largest > c.steerlm2.responses:
      raise formats.DataError(f"{path}: a prompt has {largest} responses, more than config.steerlm2.responses "
                              f"= {c.steerlm2.responses}")
  elif c.algorithm == "kto":
    feedback, stats = preference.encode_feedback(records, tok, max_length=d.max_seq_length,
                                                 chat_format=message_format(c, tok), add_eos=d.add_eos)
    examples = preference.kto_items(feedback, max_length=d.max_seq_length)
  else:
    examples, stats = encode_records(records, d.format, tok, max_length=d.max_seq_length,
                                     template=d.prompt_template, truncation=d.truncation, add_bos=d.add_bos,
                                     add_eos=d.add_eos, chat_format=message_format(c))
  log(f"{path}: {report.records} records, {report.bad_lines} bad lines skipped, "
      f"{stats.truncated} truncated, {stats.dropped} dropped, {stats.tokens} tokens")
  return examples, {"bad_lines": report.bad_lines, **stats.as_dict()}


def row_maker(c, slots: int = 1):
  """``(make_row, length)``: how a row of ``config.algorithm``'s batches is built (``slots``: pairs or
  feedback samples a row holds). ``make_row([], length, pad_id)`` is a padding row of the same shapes."""
  d = c.data
  if c.algorithm == "kd":
    return functools.partial(distillation.kd_row, top_k=c.kd.top_k), d.max_seq_length
  if c.algorithm == "rm" and d.format == "regression":
    return functools.partial(regression_rows, num_attributes=c.rm.num_attributes), d.max_seq_length
  # A row holds a pair's two sequences (KTO: a sample and its KL sample), so it is twice
  # max_seq_length; packing puts several in it.
  if c.algorithm == "steerlm2":  # a row holds one prompt's responses
    n = c.steerlm2.responses
    return functools.partial(preference.group_row, group_size=n), n * d.max_seq_length
  if c.algorithm == "kto":
    return functools.partial(preference.feedback_row, max_items=slots), 2 * d.max_seq_length
  if c.algorithm == "dpo" and c.dpo.share_prompt:
    return functools.partial(preference.shared_pairs_row, max_pairs=slots), 2 * d.max_seq_length
  if c.algorithm in ("rm", "dpo"):
    return functools.partial(preference.pairs_row, max_pairs=slots), 2 * d.max_seq_length
  return packing.build_row, d.max_seq_length


def build_data(c, tok: Tokenizer, pad_id: int, log):
  """``(train_batches, val_batches or None, train_stats)``: packed SFT rows, or rows of pairs."""
  d, t = c.data, c.train
  kwargs = dict(pad_id=pad_id, batch_size=t.global_batch_size, pad_to_multiple_of=d.pad_to_multiple_of)
  train_examples, train_stats = load_examples(c, tok, d.train, log)
  val_examples = load_examples(c, tok, d.validation, log)[0] if d.validation else None
  slots = 1
  if c.algorithm == "kd":
    train_examples = distillation.load_topk(distill.topk_path(c, d.train), train_examples,
                                            distill.fingerprint(train_examples))
    if val_examples is not None:
      val_examples = distillation.load_topk(distill.topk_path(c, d.validation), val_examples,
                                            distill.fingerprint(val_examples))
    plan = lambda examples: packing.plan_rows(examples, d.max_seq_length, pack=d.pack)
  elif (c.algorithm == "rm" and d.format == "regression") or c.algorithm == "steerlm2":
    plan = lambda items: [[i] for i in range(len(items))]
  elif c.algorithm in ("rm", "dpo", "kto"):
    # The slots per row are fixed (one compiled shape) by the fullest row.
    size = preference.shared_pair_length if c.algorithm == "dpo" and c.dpo.share_prompt else len
    plan = lambda items: preference.plan_item_rows(items, 2 * d.max_seq_length, pack=d.pack, size=size)
    slots = max(len(r) for r in plan(train_examples) + (plan(val_examples) if val_examples else []))
  else:
    plan = lambda examples: packing.plan_rows(examples, d.max_seq_length, pack=d.pack)
  kwargs["make_row"], kwargs["length"] = row_maker(c, slots)
  train_batches = pipeline.batches(plan(train_examples), train_examples, seed=c.seed, shuffle=d.shuffle, **kwargs)
  val_batches = None
  if val_examples is not None:
    val_rows = plan(val_examples)
    val_batches = lambda: pipeline.row_dataset(val_rows, val_examples, seed=0, shuffle=False, num_epochs=1,
                                               pad_last_batch=True, **kwargs)
  return train_batches, val_batches, train_stats


def algorithm_parts(c, model):
  """``(model, loss_fn, reference_fn or None)`` for ``config.algorithm``; rm puts a value head on the
  model, and ``config.lora`` adds adapters (``trainable_filter`` says what then trains)."""
  model, loss_fn, reference_fn = _algorithm_parts(c, model)
  if c.lora.rank:
    lora.add_lora(model, targets=c.lora.targets.split(","), rank=c.lora.rank, alpha=c.lora.alpha or None,
                  rngs=nnx.Rngs(c.seed + 1))
  return model, loss_fn, reference_fn


def _algorithm_parts(c, model):
  if c.algorithm == "rm" and c.data.format == "regression":
    return (ValueModel.from_transformer(model, c.rm.num_attributes, rngs=nnx.Rngs(c.seed)),
            rm.regression_train_loss, None)
  if c.algorithm == "rm":
    return (ValueModel.from_transformer(model, 1, rngs=nnx.Rngs(c.seed)),
            functools.partial(rm.train_loss, kind=c.rm.kind), None)
  if c.algorithm == "dpo":
    p = c.dpo
    loss_fn = functools.partial(dpo.train_loss, beta=p.beta, loss_type=p.loss_type, label_smoothing=p.label_smoothing,
                                gt_reward_scale=p.gt_reward_scale, simpo_gamma=p.simpo_gamma,
                                average_log_probs=p.average_log_probs, preference_weight=p.preference_weight,
                                sft_weight=p.sft_weight)
    reference = None
    if p.loss_type != "simpo":  # SimPO needs no reference
      reference = functools.partial(dpo.reference_logprobs, average=p.average_log_probs)
    return model, loss_fn, reference
  if c.algorithm == "steerlm2":
    return model, steerlm2.train_loss, None
  if c.algorithm == "kd":
    p = c.kd
    return model, functools.partial(kd.train_loss, kind=p.kind, kd_weight=p.kd_weight, sft_weight=p.sft_weight), None
  if c.algorithm == "kto":
    p = c.kto
    loss_fn = functools.partial(kto.train_loss, beta=p.beta, desirable_weight=p.desirable_weight,
                                undesirable_weight=p.undesirable_weight)
    return model, loss_fn, dpo.reference_logprobs
  return model, sft.loss, None


def load_config_file(path: str | Path, overrides: dict | None = None):
  """``get_config()`` of a config file, with dotted-key overrides (``{"train.max_steps": 10}``)."""
  import importlib.util
  path = Path(path)
  if not path.is_file():
    raise config_lib.ConfigError(f"{path}: config file not found")
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
      raise config_lib.ConfigError(f"config.{key}: no such key in {path}")
    parent[last] = value
  return c


def build_optimizer(c):
  """``(schedule, optax transformation)`` of ``config.optimizer`` over ``train.max_steps``."""
  o = c.optimizer
  schedule = optim.nemo_schedule(o.lr, max_steps=c.train.max_steps, warmup_steps=o.warmup_steps,
                                 constant_steps=o.constant_steps, min_lr=o.min_lr)
  return schedule, optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                               grad_clip=o.grad_clip or None)


def trainable_filter(c):
  """What the optimizer trains: LoRA adapters (and a reward model's new value head) when
  ``config.lora.rank`` > 0, else every parameter."""
  if not c.lora.rank:
    return nnx.Param
  if c.algorithm == "rm":
    return nnx.Any(lora.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("head")))
  return lora.LoRAParam


def build_trainer(c, log=print, *, model=None, tokenizer: Tokenizer | None = None) -> trainer.Trainer:
  """Everything a config describes, ready to ``run()``: model, data, step, checkpoints. A ``model``
  (and its ``tokenizer``) already in memory, such as SPIN's previous iteration, replaces building
  ``config.model``'s."""
  if c.algorithm in ("spin", "reinforce", "rs", "ppo"):
    raise config_lib.ConfigError(f"config.algorithm: {c.algorithm} generates its own data; jalign.train.run "
                                 f"(or jalign.{c.algorithm}.run) runs it")
  config_lib.validate(c, process_count=jax.process_count(), device_count=jax.device_count())
  mesh = pmesh.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  run_dir = Path(c.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(c.to_json_best_effort(indent=2))

  model, own_tokenizer = (model, tokenizer) if model is not None else build_model(c)
  tok = tokenizer or build_tokenizer(c, own_tokenizer)
  if tok.vocab_size > model.config.vocab_size:
    raise config_lib.ConfigError(f"config.tokenizer: {tok.vocab_size} tokens, more than the model's "
                                 f"vocabulary of {model.config.vocab_size}")
  pad_id = tok.pad_id if tok.pad_id is not None else 0
  d, t = c.data, c.train
  micro_batches = t.global_batch_size // (t.micro_batch_size * pmesh.data_parallel_size(mesh, rules))
  train_batches, val_batches, train_stats = build_data(c, tok, pad_id, log)
  (run_dir / "data_stats.json").write_text(json.dumps(train_stats, indent=2))
  lm_config = model.config
  model, loss_fn, reference_fn = algorithm_parts(c, model)

  schedule, tx = build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=trainable_filter(c))
  log(f"training {trainer.count(state.params):,} of {trainer.count(state.params) + trainer.count(state.rest):,} "
      "parameters")
  reference = None
  if reference_fn is not None:
    reference = trainer.ReferencePass(graphdef, state, reference_fn, mesh=mesh, rules=rules,
                                      offload=c.reference.offload,
                                      reference_params=lora.without_adapters if c.lora.rank else None,
                                      micro_batches=micro_batches)
  train_step = trainer.make_train_step(graphdef, loss_fn, tx, schedule, micro_batches=micro_batches)
  options = trainer.TrainerOptions(
      max_steps=t.max_steps, val_check_interval=t.val_check_interval if val_batches else 0,
      save_interval=t.save_interval, keep_last=t.keep_last, keep_best=t.keep_best if val_batches else 0,
      max_time_s=t.max_time_s, log_every=t.log_every, resume=t.resume,
      flops_per_token=trainer.train_flops_per_token(lm_config, d.max_seq_length),
      monitor="val_loss")
  return trainer.Trainer(state=state, train_step=train_step,
                         eval_step=trainer.make_eval_step(graphdef, loss_fn), train_batches=train_batches,
                         val_batches=val_batches, run_dir=run_dir, options=options, mesh=mesh, rules=rules,
                         wandb_project=t.wandb_project or None, config=c.to_dict(), graphdef=graphdef,
                         reference=reference)


def load_trained(run_dir: str | Path, step: int | None = None):
  """``(model, tokenizer, config)`` of a training run folder: its saved config rebuilt, the trained
  parameters of checkpoint ``step`` (default: the latest) restored."""
  run_dir = Path(run_dir)
  config_file = run_dir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file}: not a jalign run folder (no config.json)")
  c = config_lib.read_saved(config_file)
  model, own_tokenizer = build_model(c)
  tok = build_tokenizer(c, own_tokenizer)
  model, _, _ = algorithm_parts(c, model)
  _, tx = build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=trainable_filter(c))
  manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to load")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.replace(rest=None))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return nnx.merge(graphdef, restored.state.params, state.rest, copy=True), tok, c


def run(c, log=print) -> dict:
  """Train with a ConfigDict; returns the trainer's summary (with the loss of every step run)."""
  if c.algorithm == "spin":  # iterations of generation and DPO runs
    from jalign import spin
    return spin.run(c, log)
  if c.algorithm in ("reinforce", "rs"):  # rollouts scored by a reward model
    from jalign import reinforce
    return reinforce.run(c, log)
  if c.algorithm == "ppo":  # rollouts, a reward model and a critic trained beside the policy
    from jalign import ppo
    return ppo.run(c, log)
  loop = build_trainer(c, log)
  summary = loop.run()
  run_dir = Path(c.run_dir)
  summary["losses"] = loop.losses
  log(f"{summary['stopped']} after {summary['steps']} steps; run folder: {run_dir.absolute()}")
  return summary


def main(argv, config_flag):
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_flag.value
  if config is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  dist = config.distributed
  distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id, dist.local_device_count)
  try:
    run(config, log=print if jax.process_index() == 0 else (lambda *_: None))
  except (config_lib.ConfigError, formats.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  # Flags are defined here, not at import, so that other entry points can import this module.
  config_flag = config_flags.DEFINE_config_file("config", None, "an ml_collections config file",
                                                lock_config=True)
  app.run(lambda argv: main(argv, config_flag))


if __name__ == "__main__":
  entry()
