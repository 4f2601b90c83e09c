"""``python -m jalign.plan --config=configs/<name>.py``: compile a config's steps ahead of time.

Nothing is allocated: models, optimizer states and batches are abstract arrays carrying the shardings
the config's mesh and rules give them. The model config, optimizer, losses and jitted step functions
come from the same builders and algorithm specs the run uses (``jalign.recipes``, ``jalign.specs``),
so each train step compiled here is the program the run compiles. Each step a job runs is lowered and compiled for that job's
mesh (on a CPU machine, over that many host devices), and the planner prints, per device:

- the bytes of weights and optimizer state (exact arithmetic over shapes and shardings);
- for each step, the compiler's arguments, outputs and temporaries, plus what stays resident beside
  it (another model's weights, optimizer state not offloaded), and the job's peak over its steps;
- FLOPs per step (6 per parameter per token for training plus attention, 2 for a forward pass, the
  recomputed forward under remat) and the time at a given peak; generation is bound by memory
  bandwidth instead, so its time is the bytes each decode step reads over the HBM bandwidth.

Jobs (the spec's ``plan_jobs``): an ``sft``/``rm``/``dpo``/``kto``/``kd`` config is one job (its train
step, and for dpo/kto the reference pass). A ``ppo`` config is two jobs, as NeMo-Aligner runs it: the actor (rollout on a
bf16 inference copy of the weights laid out for tensor parallelism only, the log-prob pass of the
policy and the initial policy, the PPO train step) on ``mesh``, and the critic (values, the reward
model's scores, the critic's train step) on ``critic.mesh``.

The compiler here is the CPU one: temporaries are its estimate, a guide to what the GPU compiler
will need rather than its exact figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from jalign import config as config_lib
from jalign import config_flag as config_flag_lib
from jalign import metrics as metrics_lib
from jalign import specs, trainer
from jalign.data.packing import build_row
from jalign.losses import rloo
from jalign.models import LlamaConfig, Transformer
from jalign.models.heads import ValueModel
from jalign.models.safetensors_io import CheckpointError
from jalign.parallel import mesh as pmesh
from jalign.parallel.logical import fit_spec, logical_to_spec
from jalign.recipes import build
from jalign.recipes import critic as critic_lib
from jalign.recipes import reward as reward_lib
from jalign.recipes import rollouts
from jalign.recipes import spin as spin_lib
from jalign.rollout import engine as engine_lib
from jalign.rollout.generate import continuous_arrays, generate_arrays
from jalign.specs.base import ROW_FIELDS, ConfigError

GiB = 1024**3
# A planned program is compiled and never run: on CPU, LLVM's optimisations are skipped (buffers and FLOPs
# come from XLA's passes before LLVM, and are the same; a tiny DPO plan takes 3.7 s instead of 6.0).
UNRUN_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass
class StepPlan:
  name: str
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  resident_bytes: int        # held through the step besides its arguments (other weights, optimizer state)
  donated: bool              # arguments donated into the outputs (train steps): they count once
  flops: float               # per device
  seconds: float             # at peak FLOP/s, or HBM bandwidth for generation
  repeats: int = 1           # times per training step (PPO: per rollout batch of prompts)
  program: str = ""          # sha256 of the lowered program's text, to compare with the run's

  @property
  def total_bytes(self) -> int:
    io = max(self.argument_bytes, self.output_bytes) if self.donated else self.argument_bytes + self.output_bytes
    return io + self.temp_bytes + self.resident_bytes


@dataclasses.dataclass
class JobPlan:
  name: str
  mesh: dict
  num_params: int
  params_bytes: int          # per device: the trained model's weights (frozen ones included)
  optimizer_bytes: int       # per device
  steps: list[StepPlan]

  @property
  def peak_bytes(self) -> int:
    return max(s.total_bytes for s in self.steps)

  @property
  def seconds(self) -> float:
    """One training step (PPO: one rollout batch and the updates on it) at the given peaks."""
    return sum(s.repeats * s.seconds for s in self.steps)

  def step(self, name: str) -> StepPlan:
    return next(s for s in self.steps if s.name == name)


def per_device_bytes(tree, shardings=None) -> int:
  """Exact bytes one device holds of a sharded pytree (the largest shard, as XLA pads none here).

  ``shardings`` defaults to the shardings the abstract arrays of ``tree`` carry."""
  leaves = jax.tree.leaves(tree)
  shards = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(shardings)
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def planned_state(model, tx, mesh, rules, trainable=nnx.Param, schedule=None):
  """``(graphdef, abstract TrainState)`` of an abstract model (``nnx.eval_shape``) as the planner counts
  it: every array with the sharding ``rules`` give it on ``mesh``, as the run lays it out."""
  graphdef, abstract_state = nnx.split(model)
  state = jax.eval_shape(lambda s: trainer.init_state(nnx.merge(graphdef, s), tx, trainable=trainable,
                                                      schedule=schedule)[1], abstract_state)
  graphdef = nnx.split(model, trainable, ...)[0]
  return graphdef, _abstract(state, pmesh.tree_shardings(state, mesh, rules))


class _Job:
  """Compiles steps on one mesh and collects their plans."""

  def __init__(self, mesh, rules, peak_flops: float):
    self.mesh, self.rules, self.peak_flops = mesh, rules, peak_flops
    self.devices = mesh.size
    self.steps: list[StepPlan] = []

  def batch(self, row: dict, rows: int, rules=None) -> dict:
    """Abstract ``[rows, ...]`` arrays like ``row``'s, sharded by rows."""
    arrays = {k: jax.ShapeDtypeStruct((rows, *jnp.shape(v)), jnp.asarray(v).dtype) for k, v in row.items()}
    return _abstract(arrays, pmesh.batch_shardings(arrays, self.mesh, rules or self.rules))

  def state(self, model, tx, schedule, trainable=nnx.Param):
    return planned_state(model, tx, self.mesh, self.rules, trainable, schedule)

  def weights(self, model, rules=None, dtype=None):
    """``(graphdef, abstract state)`` of a model's weights for inference (cast to ``dtype``)."""
    graphdef, state = nnx.split(model)
    if dtype is not None:
      state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                                          else x.dtype), state)
    return graphdef, _abstract(state, pmesh.tree_shardings(state, self.mesh, rules or self.rules))

  def add(self, name, jitted, args, *, static=None, donate=False, resident=0, flops=0.0, seconds=None, repeats=1):
    """Lowers and compiles ``jitted`` (a ``jax.jit`` function, as the run jits it) on abstract ``args``
    (and the ``static`` keyword arguments it takes)."""
    lowered = jitted.lower(*args, **(static or {}))
    cpu = self.mesh.devices.flat[0].platform == "cpu"
    memory = lowered.compile(UNRUN_CPU_COMPILE if cpu else None).memory_analysis()
    per_device = flops / self.devices
    self.steps.append(StepPlan(name=name, argument_bytes=int(memory.argument_size_in_bytes),
                               output_bytes=int(memory.output_size_in_bytes),
                               temp_bytes=int(memory.temp_size_in_bytes), resident_bytes=int(resident),
                               donated=donate, flops=per_device,
                               seconds=per_device / self.peak_flops if seconds is None else seconds,
                               repeats=repeats, program=program_fingerprint(lowered)))

  def train_step(self, name, step_fn, state, batch, *, resident=0, flops=0.0, repeats=1):
    """A train step jitted as every run jits one (``trainer.jit_train_step``)."""
    jitted = trainer.jit_train_step(step_fn, jax.tree.map(lambda x: x.sharding, state),
                                    jax.tree.map(lambda x: x.sharding, batch))
    self.add(name, jitted, (state, batch), donate=True, resident=resident, flops=flops, repeats=repeats)


def program_fingerprint(lowered) -> str:
  """sha256 of a lowered program's text: equal for equal programs."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _flops(cfg: LlamaConfig, tokens: int, length: int, *, backward: bool) -> float:
  per_token = metrics_lib.train_flops_per_token(cfg, length)
  if not backward:
    return per_token / 3 * tokens
  recompute = 4 / 3 if cfg.remat != "none" else 1.0  # a second forward pass in the backward
  return per_token * tokens * recompute


def train_job(c, devices, *, peak_flops, hbm_bytes_per_s, spin=None) -> JobPlan:
  """The train step of an sft/rm/dpo/kto/kd/steerlm2 config, and the reference pass where it has one;
  with ``spin`` (the SPIN config whose DPO steps ``c`` holds), a call of its generation first."""
  rules = build.rules_of(c)
  mesh = pmesh.make_mesh(dict(c.mesh), devices=devices)
  cfg = build.model_config(c)
  t = c.train
  schedule, tx = build.build_optimizer(c)
  job = _Job(mesh, rules, peak_flops)
  with pmesh.use(mesh, rules):
    parts = {}

    def make():
      model, parts["loss"], parts["reference"] = build.algorithm_parts(c, Transformer(cfg, rngs=nnx.Rngs(0)))
      return model

    model = nnx.eval_shape(make)
    graphdef, state = job.state(model, tx, schedule, trainable=build.trainable_filter(c))
    row, length = build.abstract_row(c)
    if spin is not None:  # the iteration's replies, from the model as the last iteration left it
      s, max_seq = specs.sampling_settings(spin), spin.data.max_seq_length
      gen_graphdef, weights = job.weights(model, dtype=jnp.dtype(cfg.param_dtype))
      _add_generation(job, "generation", model, gen_graphdef, weights, rules, s, cfg, rows=s.micro_batch,
                      length=max_seq, max_new=s.max_new_tokens or max_seq // 2, resident=0, repeats=1,
                      hbm_bytes_per_s=hbm_bytes_per_s, greedy=s.greedy)
    batch = job.batch(row, t.global_batch_size)
    tokens = t.global_batch_size * length
    reference_bytes = 0
    if parts["reference"] is not None:
      micro_batches = build.micro_batches(t.global_batch_size, t.micro_batch_size, mesh, rules)
      reference = trainer.jit_reference_pass(graphdef, parts["reference"], micro_batches=micro_batches,
                                             out_sharding=pmesh.batch_sharding(mesh, rules))
      outputs = jax.eval_shape(reference, state.params, state.rest, batch)
      # The frozen copy of the starting weights (none with LoRA: the base with adapters off).
      reference_bytes = 0 if c.lora.rank or c.reference.offload else per_device_bytes(state.params)
      resident = per_device_bytes(state.opt_state) + (0 if c.lora.rank else per_device_bytes(state.params))
      job.add("reference log-probs", reference, (state.params, state.rest, batch), resident=resident,
              flops=_flops(cfg, tokens, length, backward=False))
      batch = {**batch, **_abstract(outputs, pmesh.batch_shardings(outputs, mesh, rules))}
    job.train_step("train", build.train_step(c, graphdef, parts["loss"], tx, mesh, rules), state, batch,
                   resident=reference_bytes, flops=_flops(cfg, tokens, length, backward=True))
  return JobPlan(name=c.run_dir, mesh=dict(mesh.shape), num_params=cfg.num_params,
                 params_bytes=per_device_bytes(state.params) + per_device_bytes(state.rest),
                 optimizer_bytes=per_device_bytes(state.opt_state), steps=job.steps)


def _rollout_rows(settings, data_parallel: int) -> tuple[int, int]:
  """Rows of one pass over a rollout (the rollout micro-batch on each data-parallel rank, fewer when the
  rollout's samples do not fill them, as training generates them) and how many passes cover it."""
  rows = rollouts.generation_rows(settings, data_parallel)
  return rows, math.ceil(settings.samples / rows)


def _add_generation(job, name, model, graphdef, weights, rules, sampling, cfg, *, rows, length, max_new, resident,
                    repeats, hbm_bytes_per_s, greedy=False, continuous=0):
  """``repeats`` generation calls of ``rows`` prompts of ``length - max_new`` tokens: the decode loop the
  run calls (``generate_arrays``) compiled for the job's mesh with ``weights`` laid out by ``rules``,
  timed at the memory bandwidth (weights and KV cache read once per new token). ``continuous``: one call
  of the continuous-batching loop over that many prompts with ``rows`` slots, as a run with
  ``rollout.continuous_batching`` makes it (timed as the static calls: its bound when every reply is as
  long as the longest)."""
  mesh = job.mesh
  row = {"tokens": jnp.zeros((length - max_new,), jnp.int32), "lengths": jnp.zeros((), jnp.int32),
         "ids": jnp.zeros((), jnp.int32), "limits": jnp.zeros((), jnp.int32)}
  static = dict(graphdef=graphdef, max_new_tokens=max_new, min_new_tokens=sampling.min_new_tokens,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, greedy=greedy,
                stop_ids=(0,), pad_id=0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if continuous:  # every prompt of the rollout, on every device (the loop places each in a slot)
    prompts = job.batch(row, continuous, rules)
    prompts = _abstract(prompts, jax.tree.map(lambda _: replicated, prompts))
    static.update(slots=rows, prefill_rows=pmesh.data_parallel_size(mesh, rules))
    loop, calls = continuous_arrays, 1
  else:
    prompts, loop, calls = job.batch(row, rows, rules), generate_arrays, repeats
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  with pmesh.use(mesh, rules):
    cache = jax.eval_shape(lambda: model.init_cache(rows, length))
  cache_spec = fit_spec(logical_to_spec((None, "batch", None, "act_kv_heads", None), rules), cache.k.shape, mesh)
  decode_read = per_device_bytes(weights) + per_device_bytes(cache, [jax.sharding.NamedSharding(mesh, cache_spec)] * 2)
  with pmesh.use(mesh, rules):
    job.add(name, loop, (weights, *(prompts[k] for k in ("tokens", "lengths", "ids", "limits")), key),
            static=static, resident=resident, flops=_flops(cfg, rows * repeats * length, length, backward=False) / calls,
            seconds=repeats * max_new * decode_read / hbm_bytes_per_s / calls, repeats=calls)


def _train_row(c, spec, length: int) -> dict:
  """An empty row of what a rollout algorithm's train step reads, as its rollouts make it."""
  row = {k: v for k, v in build_row([], length, 0).items() if k in ROW_FIELDS}
  for name, (kind, dtype) in spec.rollout.train_fields(c).items():
    row[name] = jnp.zeros((length,) if kind == "token" else (), dtype)
  return row


def actor_job(c, devices, *, peak_flops, hbm_bytes_per_s) -> JobPlan:
  """The actor of a rollout algorithm: generation; the policy's and the initial policy's log-probs (PPO,
  REINFORCE: the KL); the train step (PPO's clipped surrogate, REINFORCE's RLOO loss, rejection
  sampling's SFT loss on the kept samples)."""
  spec = specs.get(c.algorithm)
  settings = spec.sampling(c)
  rules = build.rules_of(c)
  mesh = pmesh.make_mesh(dict(c.mesh), devices=devices)
  cfg = build.model_config(c)
  t, length = c.train, c.data.max_seq_length
  schedule, tx = build.build_optimizer(c)
  job = _Job(mesh, rules, peak_flops)
  with pmesh.use(mesh, rules):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    policy = nnx.eval_shape(lambda: build.add_adapters(c, Transformer(cfg, rngs=nnx.Rngs(0))))
    graphdef, state = job.state(policy, tx, schedule, trainable=build.trainable_filter(c))
    # The policy's weights (with LoRA: its adapters and the frozen base) and optimizer state.
    params = per_device_bytes(state.params) + per_device_bytes(state.rest)
    optimizer = per_device_bytes(state.opt_state)
    # The initial policy, frozen: a copy of the weights (none with LoRA: the base, adapters off).
    initial = 0 if c.reference.offload or c.lora.rank or not spec.rollout.initial(c) else params
    optimizer_resident = 0 if settings.offload_optimizer else optimizer

    # Generation: a copy of the weights in the compute dtype, laid out by the generation rules
    # (default: sharded over tensor only), refitted from the trained ones (LoRA's adapters folded in).
    gen_rules = engine_lib.generation_rules(settings, rules)
    gen_graphdef, gen_weights = job.weights(model, gen_rules, dtype=jnp.dtype(c.model.dtype))
    engine = per_device_bytes(gen_weights)
    rows, rounds = _rollout_rows(settings, pmesh.data_parallel_size(mesh, gen_rules))  # rounds per rollout
    _add_generation(job, "rollout", model, gen_graphdef, gen_weights, gen_rules, settings, cfg, rows=rows,
                    length=length, max_new=settings.max_new_tokens or length // 2,
                    resident=params + initial + optimizer_resident, repeats=rounds, hbm_bytes_per_s=hbm_bytes_per_s,
                    continuous=settings.samples if c.rollout.continuous_batching else 0)
    rows, rounds = _rollout_rows(settings, pmesh.data_parallel_size(mesh, rules))

    rm_spec = config_lib.value_at(c, spec.rollout.reward_model)
    if not spec.rollout.critic and rm_spec:  # the reward model scores in the actor's job (PPO: in the critic's)
      rm_cfg = reward_lib.reward_model_config(rm_spec).replace(dtype=c.model.dtype, param_dtype=c.model.dtype)
      rm_graphdef, rm_weights = job.weights(nnx.eval_shape(lambda: ValueModel(rm_cfg, 1, rngs=nnx.Rngs(0))),
                                            dtype=jnp.dtype(c.model.dtype))
      scored = reward_lib.scoring_length(c, rm_spec)  # the rows of a generation pass at a time, as the run scores
      job.add("rewards", reward_lib.last_token_scorer(rm_graphdef),
              (rm_weights, job.batch(reward_lib.scoring_row(None, scored, 0), rows)),
              resident=params + initial + engine + optimizer_resident,
              flops=_flops(rm_cfg, rows * scored, scored, backward=False), repeats=rounds)

    if spec.rollout.old(c):  # pi_old (and pi_init for a KL) on the scored rollout, a global batch at a time
      scored = {**build_row([], length, 0), "group_ids": jnp.zeros((), jnp.int32), "is_end": jnp.zeros((), bool),
                "rewards": jnp.zeros((), jnp.float32)}
      current = trainer.jit_reference_pass(
          graphdef, rloo.token_logprobs_of,
          micro_batches=build.micro_batches(t.global_batch_size, t.micro_batch_size, mesh, rules))
      job.add("policy log-probs", current, (state.params, state.rest, job.batch(scored, t.global_batch_size)),
              resident=engine + initial + optimizer_resident,
              flops=_flops(cfg, t.global_batch_size * length, length, backward=False),
              repeats=(1 + spec.rollout.initial(c)) * math.ceil(settings.samples / t.global_batch_size))

    engine_resident = 0 if settings.unload_engine_train else engine
    job.train_step("actor train", build.train_step(c, graphdef, spec.rollout.loss(c), tx, mesh, rules),
                   state, job.batch(_train_row(c, spec, length), t.global_batch_size),
                   resident=initial + engine_resident,
                   flops=_flops(cfg, t.global_batch_size * length, length, backward=True),
                   repeats=math.ceil(settings.trained / t.global_batch_size))
  return JobPlan(name=f"{c.run_dir} actor", mesh=dict(mesh.shape), num_params=cfg.num_params, params_bytes=params,
                 optimizer_bytes=optimizer, steps=job.steps)


def critic_job(c, devices, *, peak_flops, hbm_bytes_per_s) -> JobPlan:
  """PPO's critic and reward model: values and rewards for rollouts, the critic's train step."""
  rules = build.rules_of(c)
  mesh = pmesh.make_mesh(dict(c.critic.mesh), devices=devices)
  cfg, rm_cfg = critic_lib.critic_config(c, "init"), critic_lib.critic_config(c, "reward_model")
  k, length = c.critic, c.data.max_seq_length
  settings = specs.sampling_settings(c)
  schedule, tx = critic_lib.critic_optimizer(c, critic_lib.critic_steps(c))
  job = _Job(mesh, rules, peak_flops)
  with pmesh.use(mesh, rules):
    critic = nnx.eval_shape(lambda: ValueModel(cfg, 1, rngs=nnx.Rngs(0)))
    graphdef, state = job.state(critic, tx, schedule)
    params, optimizer = per_device_bytes(state.params), per_device_bytes(state.opt_state)
    optimizer_resident = 0 if k.offload_adam_states else optimizer
    # The reward model only scores: its weights are kept in the compute dtype.
    rm_graphdef, rm_weights = job.weights(nnx.eval_shape(lambda: ValueModel(rm_cfg, 1, rngs=nnx.Rngs(0))),
                                          dtype=jnp.dtype(c.model.dtype))
    rm_bytes = per_device_bytes(rm_weights)
    # The critic job reads a rollout's rows critic.global_batch_size at a time, as Critic does.
    size, passes = k.global_batch_size, math.ceil(settings.samples / k.global_batch_size)
    rows = job.batch({name: jnp.zeros((length,), jnp.int32) for name in ("tokens", "positions", "segment_ids")}, size)
    values = trainer.jit_reference_pass(graphdef, critic_lib.values_of, out_sharding=pmesh.batch_sharding(mesh, rules),
                                        micro_batches=build.micro_batches(size, k.micro_batch_size, mesh, rules))
    job.add("values", values, (state.params, state.rest, rows), resident=rm_bytes + optimizer_resident,
            flops=_flops(cfg, size * length, length, backward=False), repeats=passes)
    scored = reward_lib.scoring_length(c, k.reward_model) if k.reward_model != "random" else length
    job.add("rewards", reward_lib.last_token_scorer(rm_graphdef),
            (rm_weights, job.batch(reward_lib.scoring_row(None, scored, 0), size)),
            resident=params + optimizer_resident, flops=_flops(rm_cfg, size * scored, scored, backward=False),
            repeats=passes)
    row = {name: jnp.zeros((length,), jnp.int32) for name in ("tokens", "positions", "segment_ids")}
    row.update({name: jnp.zeros((length,), jnp.float32) for name in ("mask", "old_values", "returns")})
    job.train_step("critic train", critic_lib.critic_train_step(c, graphdef, tx, mesh, rules), state,
                   job.batch(row, k.global_batch_size), resident=rm_bytes,
                   flops=_flops(cfg, k.global_batch_size * length, length, backward=True),
                   repeats=math.ceil(settings.prompts / k.global_batch_size))
  return JobPlan(name=f"{c.run_dir} critic", mesh=dict(mesh.shape), num_params=cfg.num_params,
                 params_bytes=params, optimizer_bytes=optimizer, steps=job.steps)


# XLA's CPU compiler computes bf16 matmuls in float32 and hoists the weight conversions out of the
# layer loop, holding a float32 copy of every layer that a GPU never makes; without loop-invariant code
# motion its temporaries are a fair guide to a GPU's. Set before JAX starts.
XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _mesh_devices(sizes) -> int:
  """Devices a mesh of these axis sizes takes: their product, or all visible with a -1 to fill."""
  sizes = dict(sizes)
  if -1 in sizes.values():
    return jax.device_count()
  return math.prod(sizes.values())


def devices_needed(c) -> int:
  jobs = specs.get(c.algorithm).plan_jobs
  sizes = [dict(c.mesh)] + ([dict(c.critic.mesh)] if "critic" in jobs else [])
  return max(math.prod(n for n in s.values() if n > 0) for s in sizes)


def _spin_job(c, devices, **kwargs) -> JobPlan:
  """A SPIN iteration: a generation call, then DPO's steps."""
  return train_job(spin_lib.as_dpo(c), devices, spin=c, **kwargs)


# The planner's job kinds (``AlgorithmSpec.plan_jobs``): (builder, the config's mesh key).
JOBS = {"train": (train_job, "mesh"), "spin": (_spin_job, "mesh"), "actor": (actor_job, "mesh"),
        "critic": (critic_job, "critic.mesh")}


def plan(c, *, peak_flops: float, hbm_bytes_per_s: float = 3.35e12) -> list[JobPlan]:
  """Compile the steps of config ``c``'s jobs, each for its mesh over the first devices visible."""
  config_lib.validate(c, device_count=_mesh_devices(c.mesh), check_files=False)
  plans = []
  for kind in specs.get(c.algorithm).plan_jobs:
    builder, mesh_key = JOBS[kind]
    sizes = c.mesh if mesh_key == "mesh" else c.critic.mesh
    plans.append(builder(c, jax.devices()[:_mesh_devices(sizes)], peak_flops=peak_flops,
                         hbm_bytes_per_s=hbm_bytes_per_s))
  return plans


def format_plan(p: JobPlan) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "one device"
  lines = [f"{p.name}: {p.num_params / 1e9:.2f}B parameters on mesh {mesh}",
           f"  per device: weights {p.params_bytes / GiB:.2f} GiB, optimizer {p.optimizer_bytes / GiB:.2f} GiB, "
           f"peak {p.peak_bytes / GiB:.2f} GiB",
           f"  {'step':<20}{'arguments':>11}{'outputs':>10}{'temporaries':>13}{'resident':>10}{'total':>9}"
           f"{'TFLOP':>9}{'seconds':>9}{'times':>7}"]
  for s in p.steps:
    lines.append(f"  {s.name:<20}{s.argument_bytes / GiB:>11.2f}{s.output_bytes / GiB:>10.2f}"
                 f"{s.temp_bytes / GiB:>13.2f}{s.resident_bytes / GiB:>10.2f}{s.total_bytes / GiB:>9.2f}"
                 f"{s.flops / 1e12:>9.1f}{s.seconds:>9.2f}{s.repeats:>7}")
  lines.append(f"  one training step: {p.seconds:.1f} s at peak (the sum of seconds x times)")
  lines.append("  (GiB and TFLOP per device; seconds at the peak FLOP/s, generation at the HBM bandwidth)")
  return "\n".join(lines)


def main(argv, config_flag, peak_flag, hbm_flag, devices_flag):
  del argv
  c = config_flag_lib.read(config_flag)
  needed = devices_flag.value or devices_needed(c)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", needed)
  try:
    plans = plan(c, peak_flops=peak_flag.value * 1e12, hbm_bytes_per_s=hbm_flag.value * 1e12)
  except (ConfigError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\n\n".join(format_plan(p) for p in plans))


def entry():
  config_flag = config_flag_lib.define()
  peak = flags.DEFINE_float("peak_tflops", 989.0, "per-device peak FLOP/s in TFLOP/s (dense bf16 H100: 989)")
  hbm = flags.DEFINE_float("hbm_tbps", 3.35, "per-device memory bandwidth in TB/s (H100 SXM: 3.35)")
  devices = flags.DEFINE_integer("devices", 0, "plan for this many devices (default: what the meshes need)")
  config_flag_lib.run(lambda argv: main(argv, config_flag, peak, hbm, devices))


if __name__ == "__main__":
  entry()
