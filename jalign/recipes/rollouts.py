"""The rollout engine that REINFORCE, rejection sampling and PPO train on, and the policy they train.

A rollout takes the next ``prompts`` prompts of the data (one shuffled order per pass), samples
``per_prompt`` responses to each from the current policy (the rollout engine of ``rollout.engine``,
``jalign.rollout.engine``: the JAX decode loop in this process or in a generation server, on a copy of
the weights in the compute dtype with any LoRA adapters folded in, refitted once per rollout; each
rollout logs the ``weight_version`` that generated it and the ``refit_s`` it took), scores them with the
``score`` it is given (a reward model, a critic job's reward model) and hands the scored batch to the
algorithm's ``prepare`` (RLOO advantages, the best samples, PPO's values and GAE), which returns what the
train step reads (the spec's fields, and no more). The batch is shuffled into global batches for the
shared ``Trainer``. The engine's own log-probs of the tokens it sampled ride along (``engine_logprobs``):
``compare_engine`` logs their gap to the trainer's and, with ``rollout.tis_cap``, weights the loss's
tokens by it. Rollout statistics go to ``metrics.jsonl`` with split ``rollout``; validation answers each
validation prompt once with a fixed seed and reports ``val_reward``.

Over several processes every process computes the whole rollout (one SPMD program over the job's
devices; each data-parallel group decodes its own rows) and hands the trainer its own rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jalign import config as config_lib
from jalign import run_folder, specs, trainer
from jalign.data import chat, formats
from jalign.data.packing import build_row
from jalign.data.preference import render_prompt
from jalign.data.prompts import encode_prompts
from jalign.data.sft import _example
from jalign.losses import offpolicy, rloo
from jalign.parallel import mesh as pmesh
from jalign.recipes import build
from jalign.rollout import engine as engine_lib
from jalign.rollout.sampling import Request
from jalign.serve.engine import ServedEngine
from jalign.specs import RolloutSettings
from jalign.specs.base import ConfigError, message_format

# (rollouts, scored batch, statistics to add to, step) -> the batch the train step reads
Prepare = Callable[["Rollouts", dict, dict, int], dict]


@dataclasses.dataclass
class Scoring:
  """What a scorer may read besides the examples: each sample's prompt and response tokens (the
  response without its stop token) and its prompt's data record (None for prompt-only data)."""
  prompts: list
  responses: list
  records: list


# (prompt + response examples, their Scoring) -> [N] rewards
Score = Callable[[list, Scoring], np.ndarray]

# config.rollout.engine -> the engine rollouts generate with
ENGINES = {"local": engine_lib.LocalEngine, "served": ServedEngine}


class Rollouts:
  """An iterator of global batches of scored samples, sampling a new rollout from the trainer's current
  policy whenever the last one is used up. ``loop`` (the Trainer) is set once it exists."""

  def __init__(self, c, settings: RolloutSettings, tok, prompts: list[list[int]], *,
               score: Score, prepare: Prepare, initial: trainer.ReferencePass | None,
               current, mesh, rules, log, val_prompts: list[list[int]] | None = None,
               records: list | None = None, val_records: list | None = None):
    self.c, self.r, self.tok, self.prompts, self.val_prompts = c, settings, tok, prompts, val_prompts
    self.records, self.val_records = records, val_records
    self.score, self.prepare = score, prepare
    self.initial, self.current = initial, current
    self.mesh, self.rules, self.log = mesh, rules, log
    self.loop = None
    self.pad = tok.pad_id if tok.pad_id is not None else 0
    self.max_new = settings.max_new_tokens or c.data.max_seq_length // 2
    self.width = max(len(p) for p in prompts + (val_prompts or []))
    self.generate_batch = generation_rows(settings, pmesh.data_parallel_size(mesh, rules) if mesh is not None else 1)
    self.fields = specs.get(c.algorithm).rollout.fields(c)  # what the train step reads of a prepared batch
    self.tis_cap = float(c.rollout.tis_cap)
    self.steps_per_rollout = settings.trained // c.train.global_batch_size
    self._queue: list[dict] = []
    self.last: dict | None = None  # the latest rollout, scored (every sample, in sampling order)
    self.prepared: dict | None = None  # and as prepared, every key (the train step reads the spec's fields)
    # Generation reads a copy of the weights in the compute dtype laid out by these rules (default:
    # sharded over tensor only, so a decode step gathers no weights), refitted once per rollout; kept
    # between rollouts unless settings.unload_engine_train (what the planner counts).
    self.generation_rules = None if mesh is None else engine_lib.generation_rules(settings, rules)
    self.engine = None  # made once the trainer exists
    self.version = None  # of the weights that generated the latest rollout
    # rollout.max_staleness 1: the next rollout generates (on the served engine) while the actor trains
    # on this one, with the weights of this one's start; (index, its samples when they come).
    self.max_staleness = int(c.rollout.max_staleness)
    self._next: tuple[int, concurrent.futures.Future] | None = None
    # EOS, and the token that closes a turn of the chat format the prompts were rendered in (NeMo's
    # end_strings: the next turn's start).
    self.stop_ids = chat.stop_ids(message_format(c, tok), tok)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self._queue:
      self._queue = self.rollout()
    # Every process computes the whole rollout (one SPMD program over the job's devices) and feeds the
    # trainer its own rows of each batch.
    return pmesh.process_rows(self._queue.pop(0))

  def _prompt_indices(self, index: int) -> np.ndarray:
    """Rollout ``index``'s prompts: consecutive slices of one shuffled order per pass over the data."""
    n, total = self.r.prompts, len(self.prompts)
    positions = np.arange(index * n, (index + 1) * n)
    orders = {}
    out = []
    for pos in positions:
      epoch = int(pos // total)
      if epoch not in orders:
        orders[epoch] = np.random.default_rng([self.c.seed, epoch]).permutation(total)
      out.append(orders[epoch][pos % total])
    return np.asarray(out)

  def _optimizer_away(self):
    """With ``offload_optimizer`` the trainer keeps its optimizer state in host memory meanwhile."""
    return self.loop.optimizer_in_host_memory(self.r.offload_optimizer)

  def rollout(self) -> list[dict]:
    with self._optimizer_away():
      batches = self._rollout()
    if self.r.unload_engine_train and self.engine is not None:
      self.engine.release()
    return batches

  def engine_ready(self):
    """The rollout engine (``config.rollout.engine``), given the trainer's current weights (a refit when
    they changed since it last had them)."""
    if self.engine is None:
      self.engine = ENGINES[self.c.rollout.engine](self.c, self.loop.graphdef, self.mesh, self.rules,
                                                   self.generation_rules, log=self.log)
    state = self.loop.state
    self.engine.update_weights(int(jax.device_get(state.step)), (state.params, state.rest))
    return self.engine

  def _rollout_prompts(self, index: int) -> list:
    """Rollout ``index``'s prompts, each repeated for its samples."""
    return self._each_sample(self.prompts, self._prompt_indices(index))

  def _each_sample(self, items: list, chosen) -> list:
    """The ``items`` of the prompts ``chosen``, each repeated for its samples."""
    return [items[i] for i in chosen for _ in range(self.r.per_prompt)]

  def _scoring(self, prompts, responses, records) -> Scoring:
    bare = [chat.without_stop(r, self.stop_ids) for r in responses]
    return Scoring(prompts, bare, records if records is not None else [None] * len(prompts))

  def _seed(self, index: int) -> int:
    return self.c.seed + 7919 * index

  def _samples_of(self, index: int) -> tuple:
    """Rollout ``index``'s samples from the engine as it is, and their weights' version."""
    samples = self.engine.generate(self._rollout_prompts(index), self._request(self._seed(index)))
    return samples.responses, samples.is_end, samples.logprobs, samples.version

  @staticmethod
  def _in_background(fn, *args) -> concurrent.futures.Future:
    """``fn(*args)`` in a daemon thread (a rollout left generating must not hold the process at exit)."""
    future = concurrent.futures.Future()

    def run():
      try:
        future.set_result(fn(*args))
      except BaseException as e:  # noqa: BLE001 - raised where the result is asked for
        future.set_exception(e)
    threading.Thread(target=run, name="next-rollout", daemon=True).start()
    return future

  def _settle(self) -> None:
    """Waits for a rollout generating in the background: the engine is then free to be refitted."""
    if self._next is not None:
      concurrent.futures.wait([self._next[1]])

  def _rollout(self) -> list[dict]:
    step = int(jax.device_get(self.loop.state.step))
    index = step // self.steps_per_rollout
    chosen = self._prompt_indices(index)
    if self._next is not None and self._next[0] == index:  # generated while the last rollout trained
      responses, is_end, sampled, self.version = self._next[1].result()
      samples = (responses, is_end, sampled)
    else:
      samples = self._generate(self._rollout_prompts(index), seed=self._seed(index))
    self._next = None
    if self.max_staleness:  # the next rollout, with the weights of now, while this one trains
      self.engine_ready()
      self._next = (index + 1, self._in_background(self._samples_of, index + 1))
    batch, stats = self.scored_groups(chosen, seed=self._seed(index), samples=samples)
    self.last = batch  # every sample of the latest rollout, rejection sampling's unkept ones too (to inspect)
    batch = self.prepared = self.prepare(self, batch, stats, step)
    batch = {key: batch[key] for key in self.fields}
    self.loop.metrics.write(step, stats, prefix="rollout")
    self.log(f"rollout {index} (step {step}): " + " ".join(f"{key}={value:.4g}" for key, value in stats.items()))
    order = np.random.default_rng([self.c.seed, index, 1]).permutation(len(batch["tokens"]))
    size = self.c.train.global_batch_size
    return [{key: value[order[i:i + size]] for key, value in batch.items()} for i in range(0, len(order), size)]

  def scored_groups(self, chosen, *, seed: int, samples=None, first_group: int = 0) -> tuple[dict, dict]:
    """``per_prompt`` samples of each of the prompts ``chosen`` (indices into the data), from the engine
    with the current weights (or the ``samples`` already made), as rows of one width with their
    engine log-probs, scored: ``(batch, statistics)``. Group ids count from ``first_group``."""
    prompts = self._each_sample(self.prompts, chosen)
    group_ids = first_group + np.repeat(np.arange(len(chosen)), self.r.per_prompt)
    records = None if self.records is None else self._each_sample(self.records, chosen)
    responses, is_end, sampled = samples or self._generate(prompts, seed=seed)
    examples = [_example([(p, False), (resp, True)]) for p, resp in zip(prompts, responses)]
    width = row_width(max(len(p) + len(r) for p, r in zip(prompts, responses)), self.c.data.max_seq_length,
                      self.c.rollout.pad_to_multiple)
    rows = [build_row([ex], width, self.pad) for ex in examples]
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    engine = np.zeros(batch["tokens"].shape, np.float32)  # in the log-prob layout: column t scores token t+1
    for row, (p, logprobs) in enumerate(zip(prompts, sampled)):
      engine[row, len(p) - 1:len(p) - 1 + len(logprobs)] = logprobs
    batch["engine_logprobs"] = engine
    rewards = self.score(examples, self._scoring(prompts, responses, records))
    stats = {"reward": float(np.mean(rewards)), "response_length": float(np.mean([len(x) for x in responses])),
             "fraction_ended": float(np.mean(is_end)), "weight_version": self.version}
    if self.engine.refit_seconds is not None:
      stats["refit_s"] = self.engine.refit_seconds
    batch["group_ids"], batch["is_end"], batch["rewards"] = group_ids.astype(np.int32), is_end, rewards
    return batch, stats

  def more_groups(self, step: int, round_: int) -> dict:
    """Round ``round_`` (1, 2, ...) of extra groups for the rollout of ``step`` being prepared, for
    algorithms that replace groups they cannot train on (DAPO's dynamic sampling): as many prompts as a
    rollout, drawn at random from the data (seeded by the rollout and the round), sampled and scored as
    its own."""
    index = step // self.steps_per_rollout
    rng = np.random.default_rng([self.c.seed, index, 2, round_])
    chosen = rng.choice(len(self.prompts), self.r.prompts, replace=len(self.prompts) < self.r.prompts)
    batch, _ = self.scored_groups(chosen, seed=self._seed(index) + 104729 * round_, first_group=round_ * self.r.prompts)
    return batch

  def validate(self) -> dict:
    """One response to each validation prompt from the current policy (the same seed every time, so
    that checkpoints compare on equal terms), scored: ``val_reward`` (the checkpoint monitor), lengths."""
    with self._optimizer_away():
      responses, is_end, _ = self._generate(self.val_prompts, seed=self.c.seed + 1)
      examples = [_example([(p, False), (resp, True)]) for p, resp in zip(self.val_prompts, responses)]
      rewards = self.score(examples, self._scoring(self.val_prompts, responses, self.val_records))
    return {"val_reward": float(np.mean(rewards)), "val_response_length": float(np.mean([len(x) for x in responses])),
            "val_fraction_ended": float(np.mean(is_end))}

  def _generate(self, prompts, *, seed):
    """Responses (token lists, the stop token included when there is one), ``is_end``, and the engine's
    log-prob of each response token under its model's own softmax (arrays of the responses' lengths),
    from the engine given the current weights. Prompt i samples with the seed folded with i, however the
    prompts are batched."""
    self._settle()
    out = self.engine_ready().generate(prompts, self._request(seed))
    self.version = out.version
    return out.responses, out.is_end, out.logprobs

  def _request(self, seed: int) -> Request:
    return Request(max_new_tokens=self.max_new, min_new_tokens=self.r.min_new_tokens, temperature=self.r.temperature,
                   top_k=self.r.top_k, top_p=self.r.top_p, stop_ids=self.stop_ids, pad_id=self.pad, seed=seed,
                   prompt_width=self.width, rows=self.generate_batch,
                   continuous=bool(self.c.rollout.continuous_batching))

  def logprobs(self, batch):
    """``(old, init)`` per-token log-probs ``[N, T]``: the current policy's and the initial policy's
    (None without an initial policy), one global batch at a time."""
    old, init = [], []
    size = self.c.train.global_batch_size
    state = self.loop.state
    for start in range(0, len(batch["tokens"]), size):
      part = {key: value[start:start + size] for key, value in batch.items()}
      part = pmesh.put_global_batch(part, self.mesh, self.rules) if self.mesh is not None else part
      old.append(pmesh.fetch(self.current(state.params, state.rest, part)["token_logprobs"]))
      if self.initial is not None:
        init.append(pmesh.fetch(self.initial(part, state)["token_logprobs"]))
    return np.concatenate(old), np.concatenate(init) if init else None

  def compare_engine(self, batch: dict, old, stats: dict) -> None:
    """Adds the gap between the engine's log-probs and the trainer's ``old`` ones over the responses
    to ``stats``; with ``rollout.tis_cap``, the tokens' truncated importance weights to ``batch``."""
    engine, mask = batch["engine_logprobs"], batch["loss_mask"]
    stats.update(offpolicy.logprob_gap(engine, old, mask))
    if self.tis_cap:
      batch["tis_weights"] = offpolicy.tis_weights(engine, old, mask, self.tis_cap)

  def behaviour_logprobs(self, batch: dict, old):
    """The log-probs an importance ratio divides by: the trainer's ``old`` ones of the weights that
    sampled the rollout, or with ``rollout.max_staleness`` the engine's, whose weights are older."""
    return batch["engine_logprobs"] if self.max_staleness else old


def concat_rows(batches: list[dict], pad_id: int) -> dict:
  """Scored batches of rollout rows, one after another: rows of different widths are padded to the
  widest (token ids with ``pad_id``, everything else with 0)."""
  width = max(b["tokens"].shape[1] for b in batches)

  def widened(key, value):
    if value.ndim < 2 or value.shape[1] == width:
      return value
    fill = pad_id if key in ("tokens", "targets") else 0
    return np.pad(value, ((0, 0), (0, width - value.shape[1])), constant_values=fill)
  return {key: np.concatenate([widened(key, b[key]) for b in batches]) for key in batches[0]}


def generation_rows(settings: RolloutSettings, data_parallel: int) -> int:
  """Rows of one generation call: NeMo's rollout micro-batch on each of ``data_parallel`` ranks, fewer
  when a rollout's samples do not fill them."""
  return min(settings.micro_batch, -(-settings.samples // data_parallel)) * data_parallel


def row_width(longest: int, max_seq_length: int, multiple: int) -> int:
  """The width of a rollout's rows: the smallest multiple of ``multiple`` that holds ``longest`` tokens,
  at most ``max_seq_length`` (which ``multiple`` 0 always takes). A few widths, so a few compiled passes."""
  if not multiple:
    return max_seq_length
  return min(max_seq_length, -(-longest // multiple) * multiple)


def load_prompts(c, settings: RolloutSettings, tok, log,
                 spec: str | None = None) -> tuple[list[list[int]], list | None]:
  """The prompt file's prompts (``data.train``, or ``spec``) as token ids, left-truncated to leave room
  for the responses, and for ``problem`` data each prompt's record (its ground truth, every field of
  its line, and ``where`` it is: ``file:line``) for the reward functions."""
  path = config_lib.data_path(spec or c.data.train)
  records, report = formats.read_jsonl(path, c.data.format, skip_bad_lines=c.data.skip_bad_lines)
  keep = c.data.max_seq_length - (settings.max_new_tokens or c.data.max_seq_length // 2)
  extra = None
  if c.data.format == "problem":  # message prompts rendered as the model is asked (its chat format)
    fmt = message_format(c, tok)
    extra = [{**r["record"], "where": f"{path}:{line}"} for r, line in zip(records, report.lines)]
    records = [{"text": render_prompt(r["prompt"], fmt)[0]} for r in records]
  encoded, stats = encode_prompts(records, tok, max_length=keep, add_bos=c.data.add_bos)
  prompts = [p.tolist() for p in encoded]
  log(f"{path}: {report.records} prompts, {report.bad_lines} bad lines skipped, {stats.truncated} cut to "
      f"{keep} tokens")
  if spec is None and len(prompts) < settings.prompts:
    raise formats.DataError(f"{path}: {len(prompts)} prompts, fewer than config.{settings.keys['prompts']} "
                            f"{settings.prompts}")
  return prompts, extra


@dataclasses.dataclass
class Policy:
  """The policy a rollout algorithm trains, and what its rollouts and trainer need from it."""
  tok: object
  prompts: list
  val_prompts: list | None
  records: list | None       # each prompt's data record, for problem data (its ground truth)
  val_records: list | None
  graphdef: object
  state: trainer.TrainState
  tx: object
  mesh: object
  rules: tuple
  initial: trainer.ReferencePass | None  # the starting policy's log-probs, frozen (for the KL)
  current: object                        # the current policy's log-probs (pi_old)


def build_policy(c, settings: RolloutSettings, log, *, with_kl: bool, with_old: bool | None = None) -> Policy:
  """The run folder, the policy of ``config.model``, its prompts and optimizer state; with ``with_kl``
  the log-prob passes of the initial and current policy, with ``with_old`` (default: ``with_kl``) that of
  the current policy."""
  if c.rollout.engine not in ENGINES:
    raise ConfigError(f"config.rollout.engine: {c.rollout.engine!r} is not one of {tuple(ENGINES)}")
  mesh, rules, _ = build.prepare_run(c)
  model, own = build.build_model(c, mesh, rules)
  model = build.algorithm_parts(c, model, mesh, rules)[0]  # config.lora's adapters, which alone then train
  tok = build.build_tokenizer(c, own)
  prompts, records = load_prompts(c, settings, tok, log)
  val_prompts, val_records = (load_prompts(c, settings, tok, log, c.data.validation) if c.data.validation
                              else (None, None))
  t = c.train
  micro_batches = build.micro_batches(t.global_batch_size, t.micro_batch_size, mesh, rules)
  schedule, tx = build.build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=build.trainable_filter(c),
                                       schedule=schedule, mesh=mesh, rules=rules)
  initial = current = None
  if with_kl:
    # With LoRA the starting policy is the base model, adapters off: no copy of its weights.
    initial = build.reference_pass(c, graphdef, state, rloo.token_logprobs_of, mesh, rules)
  if with_kl if with_old is None else with_old:
    current = trainer.jit_reference_pass(graphdef, rloo.token_logprobs_of, micro_batches=micro_batches)
  return Policy(tok, prompts, val_prompts, records, val_records, graphdef, state, tx, mesh, rules,
                initial, current)


def trainer_options(c, has_val_prompts: bool) -> trainer.TrainerOptions:
  """The loop's options for training on rollouts: validation by the reward of generated replies,
  checkpoints kept by the highest."""
  t = c.train
  validating = has_val_prompts and t.val_check_interval > 0
  return trainer.TrainerOptions(max_steps=t.max_steps, val_check_interval=t.val_check_interval if validating else 0,
                                save_interval=t.save_interval, keep_last=t.keep_last,
                                keep_best=t.keep_best if validating else 0, monitor="val_reward",
                                monitor_higher_is_better=True, max_time_s=t.max_time_s, log_every=t.log_every,
                                resume=t.resume, skip_unreadable_checkpoints=t.skip_unreadable_checkpoints)


def rollout_trainer(c, rollouts: Rollouts, policy: Policy, loss_fn, *, options=None,
                    companion=None) -> trainer.Trainer:
  """The shared Trainer of ``policy`` fed by ``rollouts`` (which get it as their ``loop``)."""
  options = options or trainer_options(c, bool(policy.val_prompts))
  run_folder.check_config(c)
  graphdef = policy.graphdef
  loop = trainer.Trainer(state=policy.state,
                         train_step=build.train_step(c, graphdef, loss_fn, policy.tx, policy.mesh, policy.rules),
                         eval_step=trainer.make_eval_step(graphdef, loss_fn), train_batches=rollouts,
                         validator=rollouts.validate if options.val_check_interval else None,
                         run_dir=Path(c.run_dir), options=options, mesh=policy.mesh, rules=policy.rules,
                         wandb_project=c.train.wandb_project or None, config=c.to_dict(), graphdef=graphdef,
                         companion=companion,
                         on_start=functools.partial(run_folder.record_config, c))  # process 0 alone writes and says
  rollouts.loop = loop
  return loop


def run_loop(c, loop: trainer.Trainer, log) -> dict:
  """Runs a rollout algorithm's trainer; its summary, with the loss of every step run."""
  summary = loop.run()
  summary["losses"] = loop.losses
  log(f"{summary['stopped']} after {summary['steps']} steps; run folder: {Path(c.run_dir).absolute()}")
  return summary
