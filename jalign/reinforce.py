"""REINFORCE with the leave-one-out baseline (NeMo-Aligner's ``gpt_reinforce_actor.yaml``): the policy
samples, a reward model scores, and the policy trains on what it sampled.

A rollout takes the next ``reinforce.num_rollout_samples`` prompts and samples
``num_rollouts_per_prompt`` responses to each from the current policy (the JAX decode loop). Then:
  - the reward model (a jalign ``rm`` run) scores each prompt + response as tokens, standardised as in
    ``jalign.score``;
  - the policy's log-probs now (pi_old) and the initial policy's (the starting weights, frozen) give each
    sample's KL, the masked mean of ``|log pi_old - log pi_init|``, and its reward R = r - kl_coef * KL;
  - the baseline of a sample is the mean R of the other samples of its prompt that ended
    (``algos.rloo.baseline``), the advantage R - b;
  - the samples, shuffled, make ``num_rollout_samples * num_rollouts_per_prompt / global_batch_size``
    optimizer steps of ``algos.rloo.train_loss``, the masked mean of ``-log pi(t) * advantage`` over the
    responses of the samples that ended (a response cut off by the length limit trains nothing).
Rollout statistics (reward, KL, lengths, how many ended) go to ``metrics.jsonl`` with split ``rollout``.
Validation (``data.validation``, every ``train.val_check_interval`` steps) answers each validation prompt
once, with a fixed seed, and reports the mean reward ``val_reward``, by which ``train.keep_best`` keeps
checkpoints (higher is better). The loop, checkpoints and resume are the shared trainer's; a resumed run
starts a fresh rollout.

Online rejection sampling (``algorithm = "rs"``, NeMo's ``gpt_rs_actor.yaml``) samples and scores the
same way, keeps each prompt's ``rs.top_n_rollouts`` highest-reward samples and trains on them with the
SFT loss over their responses; it needs no KL and no initial policy.

PPO (``jalign.ppo``) samples from these rollouts too, one response per prompt, with its own ``prepare``.

Over several processes every process computes the whole rollout (one SPMD program over the job's
devices; each data-parallel group decodes its own rows) and hands the trainer its own rows of each batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign import config as config_lib
from jalign import train, trainer
from jalign.algos import rloo, sft
from jalign.data import formats
from jalign.data.packing import build_row
from jalign.data.sft import _example
from jalign.parallel import mesh as pmesh
from jalign.rollout.generate import generate
from jalign.score import RewardModel


class Rollouts:
  """An iterator of global batches of scored samples, sampling a new rollout from the trainer's current
  policy whenever the last one is used up. ``loop`` (the Trainer) is set once it exists."""

  def __init__(self, c, tok, prompts: list[list[int]], reward: RewardModel, initial: trainer.ReferencePass | None,
               current, *, mesh, rules, log, val_prompts: list[list[int]] | None = None):
    self.c, self.r, self.tok, self.prompts, self.val_prompts = c, sampling_config(c), tok, prompts, val_prompts
    self.reward, self.initial, self.current = reward, initial, current
    self.mesh, self.rules, self.log = mesh, rules, log
    self.loop = None
    self.pad = tok.pad_id if tok.pad_id is not None else 0
    self.max_new = self.r.max_new_tokens or c.data.max_seq_length // 2
    self.width = max(len(p) for p in prompts + (val_prompts or []))
    # PPO (jalign.ppo) samples once per prompt.
    self.per_prompt = 1 if c.algorithm == "ppo" else self.r.num_rollouts_per_prompt
    self.generate_batch = generation_rows(c, pmesh.data_parallel_size(mesh, rules) if mesh is not None else 1)
    self.top_n = c.rs.top_n_rollouts if c.algorithm == "rs" else 0  # rejection sampling keeps these
    kept = self.top_n or self.per_prompt
    self.steps_per_rollout = self.r.num_rollout_samples * kept // c.train.global_batch_size
    self._queue: list[dict] = []
    self.last: dict | None = None
    # Generation reads a copy of the weights in the compute dtype laid out by these rules (default:
    # sharded over tensor only, so a decode step gathers no weights), refitted once per rollout; kept
    # between rollouts unless ppo.unload_engine_train (what the planner counts).
    self.generation_rules = None if mesh is None else generation_rules(c, rules)
    self.unload_generation_copy = c.algorithm == "ppo" and c.ppo.unload_engine_train
    self._generation_copy = None  # (step, model)
    # EOS, and the next turn's start of the chat format the prompts were rendered in (NeMo's end_strings).
    turn = tok.encode(train.message_format(c).turn_start, add_special_tokens=False)
    self.stop_ids = tuple(i for i in (tok.eos_id, turn[0] if len(turn) == 1 else None) if i is not None)

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
    n, total = self.r.num_rollout_samples, len(self.prompts)
    positions = np.arange(index * n, (index + 1) * n)
    orders = {}
    out = []
    for pos in positions:
      epoch = int(pos // total)
      if epoch not in orders:
        orders[epoch] = np.random.default_rng([self.c.seed, epoch]).permutation(total)
      out.append(orders[epoch][pos % total])
    return np.asarray(out)

  @contextlib.contextmanager
  def optimizer_in_host_memory(self):
    """With ``ppo.offload_adam_states``: the optimizer state waits in pinned host memory while the
    rollout generates and scores (NeMo's offload of the Adam states), back on the devices for training."""
    loop = self.loop
    if not (self.c.algorithm == "ppo" and self.c.ppo.offload_adam_states and loop.state_sharding is not None):
      yield
      return
    on_devices = loop.state_sharding.opt_state
    in_host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), on_devices)
    loop.state = loop.state.replace(opt_state=jax.device_put(loop.state.opt_state, in_host))
    try:
      yield
    finally:
      loop.state = loop.state.replace(opt_state=jax.device_put(loop.state.opt_state, on_devices))

  def rollout(self) -> list[dict]:
    with self.optimizer_in_host_memory():
      batches = self._rollout()
    if self.unload_generation_copy:
      self._generation_copy = None
    return batches

  def generation_model(self):
    """The policy generation runs: the trainer's current weights, or their generation copy (refitted
    when the weights have changed since it was made)."""
    if self.generation_rules is None:
      return self.loop.model()
    step = int(jax.device_get(self.loop.state.step))
    if self._generation_copy is None or self._generation_copy[0] != step:
      self._generation_copy = None  # its memory goes before the refit takes more
      dtype = jnp.dtype(self.c.model.dtype)
      cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
      state = self.loop.state
      weights = jax.tree.map(cast, (state.params, state.rest))
      weights = pmesh.place(weights, pmesh.tree_shardings(weights, self.mesh, self.generation_rules))
      self._generation_copy = (step, nnx.merge(self.loop.graphdef, *weights))
    return self._generation_copy[1]

  def _rollout(self) -> list[dict]:
    step = int(jax.device_get(self.loop.state.step))
    index = step // self.steps_per_rollout
    k = self.per_prompt
    chosen = self._prompt_indices(index)
    prompts = [self.prompts[i] for i in chosen for _ in range(k)]
    group_ids = np.repeat(np.arange(len(chosen)), k)
    responses, is_end = self._generate(prompts, seed=self.c.seed + 7919 * index)
    examples = [_example([(p, False), (resp, True)]) for p, resp in zip(prompts, responses)]
    rows = [build_row([ex], self.c.data.max_seq_length, self.pad) for ex in examples]
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    rewards = self.score(examples)
    stats = {"reward": float(np.mean(rewards)), "response_length": float(np.mean([len(x) for x in responses])),
             "fraction_ended": float(np.mean(is_end))}
    batch["group_ids"], batch["is_end"], batch["rewards"] = group_ids.astype(np.int32), is_end, rewards
    self.last = batch  # every sample of the latest rollout, rejection sampling's unkept ones too (to inspect)
    batch = self.prepare(batch, stats, step)
    self.loop.metrics.write(step, stats, prefix="rollout")
    self.log(f"rollout {index} (step {step}): " + " ".join(f"{key}={value:.4g}" for key, value in stats.items()))
    order = np.random.default_rng([self.c.seed, index, 1]).permutation(len(batch["tokens"]))
    size = self.c.train.global_batch_size
    return [{key: value[order[i:i + size]] for key, value in batch.items()} for i in range(0, len(order), size)]

  def prepare(self, batch: dict, stats: dict, step: int) -> dict:
    """What the algorithm trains on from a scored rollout; adds its statistics to ``stats``."""
    rewards, group_ids, is_end = batch["rewards"], batch["group_ids"], batch["is_end"]
    if self.top_n:
      keep = top_per_group(rewards, group_ids, self.top_n)
      batch = {key: value[keep] for key, value in batch.items()}
      stats["selected_reward"] = float(np.mean(rewards[keep]))
    else:
      old, init = self._logprobs(batch)
      kl = np.asarray(rloo.sequence_kl(old, init, batch["loss_mask"], absolute_kl=self.r.absolute_kl))
      total = rewards - self.r.kl_coef * kl
      baselines = np.asarray(rloo.baseline(total, group_ids, is_end))
      batch["advantages"] = (total - baselines).astype(np.float32)
      # Responses cut off by the length limit train nothing ("micro-batches without any ended sample get
      # zero loss"), as in NeMo's PPO actor; they still shape the baselines' counts through is_end.
      batch["loss_mask"] = batch["loss_mask"] * is_end[:, None]
      stats.update(init_policy_kl=float(np.mean(kl)), rewards_with_kl=float(np.mean(total)),
                   advantage_std=float(np.std(batch["advantages"])))
    return batch

  def score(self, examples) -> np.ndarray:
    """``[N]`` standardised rewards of prompt + response examples."""
    return self.reward.rewards(examples, batch_size=self.generate_batch)

  def validate(self) -> dict:
    """One response to each validation prompt from the current policy (the same seed every time, so
    that checkpoints compare on equal terms), scored: ``val_reward`` (the checkpoint monitor), lengths."""
    with self.optimizer_in_host_memory():
      responses, is_end = self._generate(self.val_prompts, seed=self.c.seed + 1)
      examples = [_example([(p, False), (resp, True)]) for p, resp in zip(self.val_prompts, responses)]
      rewards = self.score(examples)
    return {"val_reward": float(np.mean(rewards)), "val_response_length": float(np.mean([len(x) for x in responses])),
            "val_fraction_ended": float(np.mean(is_end))}

  def _generate(self, prompts, *, seed):
    """Responses (token lists, the stop token included when there is one) and ``is_end``."""
    model = self.generation_model()
    size = self.generate_batch
    responses, ended = [], []
    stops = self.stop_ids
    # Each data-parallel group decodes its own rows of a batch (all of them when they do not divide).
    rules = self.generation_rules or self.rules
    split = self.mesh is not None and size % pmesh.data_parallel_size(self.mesh, rules) == 0
    rows = pmesh.batch_sharding(self.mesh, rules) if split else None
    for start in range(0, len(prompts), size):
      chunk = prompts[start:start + size]
      out = generate(model, chunk + [chunk[0]] * (size - len(chunk)), max_new_tokens=self.max_new,
                     min_new_tokens=self.r.min_new_tokens, temperature=self.r.temperature, top_k=self.r.top_k,
                     top_p=self.r.top_p, stop_ids=stops, pad_id=self.pad, seed=seed + start,
                     prompt_width=self.width, batch_sharding=rows)
      responses += out.responses()[:len(chunk)]
      ended += pmesh.fetch(out.is_end)[:len(chunk)].tolist()
    return responses, np.asarray(ended, bool)

  def _logprobs(self, batch):
    """``(old, init)`` per-token log-probs ``[N, T]``: the current policy's and the initial policy's,
    one global batch at a time."""
    old, init = [], []
    size = self.c.train.global_batch_size
    state = self.loop.state
    for start in range(0, len(batch["tokens"]), size):
      part = {key: value[start:start + size] for key, value in batch.items()}
      part = pmesh.put_global_batch(part, self.mesh, self.rules) if self.mesh is not None else part
      old.append(pmesh.fetch(self.current(state.params, state.rest, part)["token_logprobs"]))
      init.append(pmesh.fetch(self.initial(part, state)["token_logprobs"]))
    return np.concatenate(old), np.concatenate(init)


def sampling_config(c):
  """The config block that sets the rollouts' sampling: ``ppo`` for PPO, else ``reinforce``."""
  return c.ppo if c.algorithm == "ppo" else c.reinforce


def rollout_samples(c) -> int:
  """Samples in one rollout: one per prompt for PPO, ``num_rollouts_per_prompt`` otherwise."""
  r = sampling_config(c)
  return r.num_rollout_samples * (1 if c.algorithm == "ppo" else r.num_rollouts_per_prompt)


def generation_rows(c, data_parallel: int) -> int:
  """Rows of one generation call: NeMo's rollout micro-batch (``ppo.rollout_micro_batch_size``,
  ``reinforce.rollout_batch_size``) on each of ``data_parallel`` ranks, fewer when a rollout's samples
  do not fill them."""
  r = sampling_config(c)
  per_rank = r.rollout_micro_batch_size if c.algorithm == "ppo" else r.rollout_batch_size
  return min(per_rank, -(-rollout_samples(c) // data_parallel)) * data_parallel


def generation_rules(c, rules):
  """The rules of the generation copy of the weights: ``ppo.generation_rules``, or by default the
  training ``rules`` sharded over tensor only."""
  own = tuple(tuple(r) for r in c.ppo.generation_rules) if c.algorithm == "ppo" else ()
  return own or pmesh.inference_rules(rules)


def top_per_group(rewards, group_ids, n: int) -> np.ndarray:
  """Indices of each group's ``n`` highest rewards (the earlier sample first among equals), in order."""
  keep = []
  for g in np.unique(group_ids):
    members = np.flatnonzero(group_ids == g)
    keep += members[np.argsort(-rewards[members], kind="stable")[:n]].tolist()
  return np.sort(np.asarray(keep))


def load_prompts(c, tok, log, spec: str | None = None) -> list[list[int]]:
  """The prompt file's texts (``data.train``, or ``spec``) as token ids, left-truncated to leave room for
  the responses."""
  path = config_lib.data_path(spec or c.data.train)
  records, report = formats.read_jsonl(path, c.data.format, skip_bad_lines=c.data.skip_bad_lines)
  sampling = sampling_config(c)
  keep = c.data.max_seq_length - (sampling.max_new_tokens or c.data.max_seq_length // 2)
  prompts = [tok.encode(r["text"], add_special_tokens=c.data.add_bos)[-keep:] for r in records]
  log(f"{path}: {report.records} prompts, {report.bad_lines} bad lines skipped, "
      f"{sum(len(tok.encode(r['text'])) > keep for r in records)} cut to {keep} tokens")
  if spec is None and len(prompts) < sampling.num_rollout_samples:
    block = "ppo" if c.algorithm == "ppo" else "reinforce"
    raise formats.DataError(f"{path}: {len(prompts)} prompts, fewer than config.{block}.num_rollout_samples "
                            f"{sampling.num_rollout_samples}")
  return prompts


@dataclasses.dataclass
class Policy:
  """The policy a rollout algorithm trains, and what its rollouts and trainer need from it."""
  tok: object
  prompts: list
  val_prompts: list | None
  graphdef: object
  state: trainer.TrainState
  tx: object
  schedule: object
  micro_batches: int
  mesh: object
  rules: tuple
  initial: trainer.ReferencePass | None  # the starting policy's log-probs, frozen (for the KL)
  current: object                        # the current policy's log-probs (pi_old)


def build_policy(c, log, *, with_kl: bool) -> Policy:
  """The run folder, the policy of ``config.model``, its prompts and optimizer state; with ``with_kl``
  the log-prob passes of the initial and current policy."""
  config_lib.validate(c, process_count=jax.process_count(), device_count=jax.device_count())
  mesh = pmesh.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  run_dir = Path(c.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(c.to_json_best_effort(indent=2))
  model, own = train.build_model(c)
  tok = train.build_tokenizer(c, own)
  prompts = load_prompts(c, tok, log)
  val_prompts = load_prompts(c, tok, log, c.data.validation) if c.data.validation else None
  t = c.train
  micro_batches = t.global_batch_size // (t.micro_batch_size * pmesh.data_parallel_size(mesh, rules))
  schedule, tx = train.build_optimizer(c)
  graphdef, state = trainer.init_state(model, tx, seed=c.seed, trainable=train.trainable_filter(c))
  initial = current = None
  if with_kl:
    initial = trainer.ReferencePass(graphdef, state, rloo.token_logprobs_of, mesh=mesh, rules=rules,
                                    offload=c.reference.offload, micro_batches=micro_batches)
    current = jax.jit(functools.partial(trainer.reference_pass, graphdef, rloo.token_logprobs_of,
                                        micro_batches=micro_batches))
  return Policy(tok, prompts, val_prompts, graphdef, state, tx, schedule, micro_batches, mesh, rules, initial, current)


def build(c, log=print) -> tuple[trainer.Trainer, Rollouts]:
  """The trainer of a REINFORCE (or rejection sampling) config, fed by its rollouts."""
  policy = build_policy(c, log, with_kl=c.algorithm == "reinforce")  # the KL needs both policies' log-probs
  reward = RewardModel.load_to_score(c, "reinforce.reward_model")
  if reward.tokenizer.vocab_size != policy.tok.vocab_size:
    raise config_lib.ConfigError(f"config.reinforce.reward_model: its tokenizer ({reward.tokenizer.vocab_size} "
                                 f"tokens) is not the policy's ({policy.tok.vocab_size}); it scores the policy's tokens")
  # The reward model scores inside the trainer's mesh, so its weights live there too (by the same rules).
  reward.place(policy.mesh, policy.rules)
  rollouts = Rollouts(c, policy.tok, policy.prompts, reward, policy.initial, policy.current, mesh=policy.mesh,
                      rules=policy.rules, log=log, val_prompts=policy.val_prompts)
  loop = rollout_trainer(c, rollouts, policy, rloo.train_loss if c.algorithm == "reinforce" else sft.loss)
  return loop, rollouts


def trainer_options(c, has_val_prompts: bool) -> trainer.TrainerOptions:
  """The loop's options for training on rollouts: validation by the reward of generated replies,
  checkpoints kept by the highest."""
  t = c.train
  validating = has_val_prompts and t.val_check_interval > 0
  return trainer.TrainerOptions(max_steps=t.max_steps, val_check_interval=t.val_check_interval if validating else 0,
                                save_interval=t.save_interval, keep_last=t.keep_last,
                                keep_best=t.keep_best if validating else 0, monitor="val_reward",
                                monitor_higher_is_better=True, max_time_s=t.max_time_s, log_every=t.log_every,
                                resume=t.resume)


def rollout_trainer(c, rollouts: Rollouts, policy: Policy, loss_fn, *, options=None,
                    companion=None) -> trainer.Trainer:
  """The shared Trainer of ``policy`` fed by ``rollouts`` (which get it as their ``loop``)."""
  options = options or trainer_options(c, bool(policy.val_prompts))
  graphdef = policy.graphdef
  loop = trainer.Trainer(state=policy.state,
                         train_step=trainer.make_train_step(graphdef, loss_fn, policy.tx, policy.schedule,
                                                            micro_batches=policy.micro_batches),
                         eval_step=trainer.make_eval_step(graphdef, loss_fn), train_batches=rollouts,
                         validator=rollouts.validate if options.val_check_interval else None,
                         run_dir=Path(c.run_dir), options=options, mesh=policy.mesh, rules=policy.rules,
                         wandb_project=c.train.wandb_project or None, config=c.to_dict(), graphdef=graphdef,
                         companion=companion)
  rollouts.loop = loop
  return loop


def run(c, log=print, *, build=build) -> dict:
  loop, _ = build(c, log)
  summary = loop.run()
  summary["losses"] = loop.losses
  log(f"{summary['stopped']} after {summary['steps']} steps; run folder: {Path(c.run_dir).absolute()}")
  return summary
