"""The training loop every algorithm reuses.

Two halves, kept apart:
- pure, jitted functions: ``make_train_step(...)(state, batch) -> (state, metrics)`` with gradient
  accumulation over micro-batches inside one step, and ``make_eval_step``;
- ``Trainer``, the Python that feeds them: batches, validation, orbax checkpoints (async, atomic,
  keep the last N and the best by a metric), resume, SIGTERM and time limits, NaN stops, metrics in
  ``metrics.jsonl`` and TensorBoard event files, optionally Weights & Biases, and a progress display.

An algorithm supplies ``loss_fn(model, micro_batch, rng) -> (loss_sum, weight, metric_sums)``; the
step's loss is ``sum(loss_sum) / sum(weight)`` over all micro-batches, and each reported metric is
its sum divided by the same total weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jalign.checkpoints import checkpoint_manager, checkpoint_steps, failure_reason, restore_newest_readable
from jalign import metrics as metrics_lib
from jalign.metrics import MetricsWriter, Progress
from jalign.parallel import mesh as pmesh

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


class TrainingError(RuntimeError):
  pass


class _SecondSignal(Exception):
  """Raised by a SIGTERM that comes while the trainer already stops for one."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken
  params: Any           # nnx.State of the trained parameters
  rest: Any             # any other model state
  opt_state: Any
  rng: jax.Array        # uint32[2], split once per step
  schedule: Any = None  # the optimizer's rate schedule as arrays (optim.NemoSchedule), handed to its update


def checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds of a state: not ``rest`` (frozen weights, kept as an empty entry) nor the
  schedule, both rebuilt from the config."""
  return {"step": state.step, "params": state.params, "rest": None, "opt_state": state.opt_state, "rng": state.rng}


def restored_state(saved: dict, state: TrainState) -> TrainState:
  """``state`` with what a checkpoint held (``checkpointed``) in place of its own."""
  return state.replace(**{k: v for k, v in saved.items() if k != "rest"})


def init_state(model, tx: optax.GradientTransformation, seed: int = 0, trainable=nnx.Param, *, schedule=None,
               mesh=None, rules=pmesh.DEFAULT_RULES):
  """``(graphdef, TrainState)`` for an NNX model; ``trainable`` (an NNX filter, e.g. ``LoRAParam``)
  picks the parameters the optimizer updates, everything else stays fixed in ``rest``. ``schedule``
  (an ``optim.NemoSchedule``, for ``optim.adamw``) is the rate the train step hands ``tx``. With ``mesh``,
  the optimizer state is created by a jitted ``tx.init`` straight into the shardings ``rules`` give
  it (the parameters keep theirs)."""
  graphdef, params, rest = nnx.split(model, trainable, ...)
  if mesh is None:
    opt_state = tx.init(params)
  else:
    with pmesh.use(mesh, rules):
      shardings = pmesh.tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
      opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=opt_state,
                     rng=jax.random.PRNGKey(seed), schedule=schedule)
  return graphdef, state


def _split_micro(batch, micro_batches: int):
  """``[B, ...] -> [M, B/M, ...]`` with micro-batch i = rows i, i+M, i+2M, ...

  Strided, so that a batch sharded by rows stays sharded the same way within every micro-batch.
  """
  def split(x):
    if x.shape[0] % micro_batches:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {micro_batches} micro-batches")
    return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *, micro_batches: int = 1):
  """A pure ``(state, batch) -> (state, metrics)``; jit it (with ``donate_argnums=0``). A state with a
  ``schedule`` hands it to ``tx.update`` and reports its rate as ``lr``."""

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    micro = _split_micro(batch, micro_batches)

    def grads_of(mb, i):
      def f(params):
        # copy=True: rest may hold arrays (frozen base weights under LoRA) from outside this trace.
        model = nnx.merge(graphdef, params, state.rest, copy=True)
        total, weight, sums = loss_fn(model, mb, jax.random.fold_in(step_rng, i))
        return total, (weight, sums)
      (total, (weight, sums)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
      return grads, total, weight, sums

    def accumulate(carry, xs):
      mb, i = xs
      grads, total, weight, sums = grads_of(mb, i)
      acc_g, acc_t, acc_w, acc_s = carry
      return (jax.tree.map(jnp.add, acc_g, grads), acc_t + total, acc_w + weight,
              jax.tree.map(jnp.add, acc_s, sums)), None

    if micro_batches == 1:
      g0, t0, w0, s0 = grads_of(jax.tree.map(lambda x: x[0], micro), 0)
    else:
      # From zeros (0 + g is g exactly), so that the program holds one forward and backward pass, the
      # loop's: a first micro-batch taken out of the loop would be a second copy to compile.
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), 0))
      (g0, t0, w0, s0), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(micro_batches)))
    weight = jnp.maximum(w0, 1e-9)
    grads = jax.tree.map(lambda g: g / weight, g0)
    scheduled = {} if state.schedule is None else {"schedule": state.schedule}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **scheduled)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": t0 / weight, "grad_norm": optax.tree.norm(grads), "weight": w0}
    metrics.update({k: v / weight for k, v in s0.items()})
    if state.schedule is not None:
      metrics["lr"] = state.schedule(state.step)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, metrics

  return step


def jit_train_step(train_fn, state_sharding=None, batch_sharding=None):
  """``train_fn`` jitted as every trained model runs it (the planner lowers this too): the state
  donated, and with shardings, the state and batch laid out by them and the state kept so."""
  if state_sharding is None:
    return jax.jit(train_fn, donate_argnums=0)
  return jax.jit(train_fn, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, None))


def make_eval_step(graphdef, loss_fn: LossFn):
  """A pure ``(state, batch) -> (loss_sum, weight, metric_sums)``."""

  def evaluate(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params, state.rest, copy=True)
    return loss_fn(model, batch, jax.random.PRNGKey(0))

  return evaluate


def reference_pass(graphdef, fn, params, rest, batch, *, micro_batches: int = 1):
  """``fn(model, batch)`` (per-row outputs) over ``micro_batches`` parts of the batch, one at a time;
  the rows come back in the batch's order."""
  if micro_batches == 1:
    return fn(nnx.merge(graphdef, params, rest, copy=True), batch)
  micro = _split_micro(batch, micro_batches)
  out = jax.lax.map(lambda mb: fn(nnx.merge(graphdef, params, rest, copy=True), mb), micro)
  # [M, B/M, ...] back to rows i, i+M, ... of micro-batch i, the inverse of _split_micro.
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), out)


def jit_reference_pass(graphdef, fn, *, micro_batches: int = 1, out_sharding=None):
  """``reference_pass`` of ``fn`` jitted as the runs call it (the planner lowers this too):
  ``(params, rest, batch) -> per-row outputs``, laid out by ``out_sharding``."""
  return jax.jit(functools.partial(reference_pass, graphdef, fn, micro_batches=micro_batches),
                 out_shardings=out_sharding)


class ReferencePass:
  """The starting trained parameters, frozen, and one jitted function of them for reference passes.

  ``fn(model, batch) -> dict`` runs on the reference model (e.g. the DPO policy's log-probs at step 0);
  the same function of the same parameters gives bitwise the same arrays every time. The fixed part
  of the model (``state.rest``) is the trainer's current one, passed in on each call, so with LoRA
  (``reference_params=lora.without_adapters``: the base model, adapters off) no copy of the base
  weights exists. With ``offload`` the frozen copy lives in host memory (pinned, laid out as on the
  devices; numpy without a mesh) and is moved to the devices for each pass, as NeMo-Aligner swaps its
  reference weights in from CPU. The batch goes through in ``micro_batches`` parts (those of the train
  step), so that the pass holds one micro-batch's activations at a time.
  """

  def __init__(self, graphdef, state: TrainState, fn, *, mesh=None, rules=pmesh.DEFAULT_RULES,
               offload: bool = False, reference_params=None, micro_batches: int = 1):
    self.offload = offload
    self.sharding = pmesh.tree_shardings(state.params, mesh, rules) if mesh is not None else None
    params = state.params if reference_params is None else reference_params(state.params)
    if offload and self.sharding is None:
      self.params = jax.device_get(params)
    elif offload:  # each device's part in pinned host memory, never gathered whole
      self.params = jax.device_put(params, jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), self.sharding))
    else:  # its own buffers: the train step donates the state's
      placed = params if self.sharding is None else pmesh.place(params, self.sharding)
      self.params = jax.tree.map(jnp.copy, placed)
    # Outputs are per-row ([B, ...]) and sharded by rows like the batch they join.
    out = None if mesh is None else pmesh.batch_sharding(mesh, rules)
    self._fn = jit_reference_pass(graphdef, fn, micro_batches=micro_batches, out_sharding=out)

  def __call__(self, batch, state: TrainState):
    params = self.params
    if self.offload:
      params = jax.device_put(params, self.sharding) if self.sharding is not None else jax.device_put(params)
    return self._fn(params, state.rest, batch)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainerOptions:
  max_steps: int
  val_check_interval: int = 0       # 0: no validation
  save_interval: int = 0            # 0: save only at the end (and on SIGTERM / time limit)
  keep_last: int = 2
  keep_best: int = 1                # by ``monitor``; 0: keep only the last ones
  monitor: str = "val_loss"
  monitor_higher_is_better: bool = False  # a reward, rather than a loss
  max_time_s: float = 0.0           # 0: no limit
  log_every: int = 10
  resume: bool = True
  skip_unreadable_checkpoints: bool = False  # resume from the newest checkpoint that can be read
  flops_per_token: float = 0.0      # for the MFU estimate


class Trainer:
  """Runs a jitted train step over batches, with validation, checkpoints and metrics."""

  def __init__(self, *, state: TrainState, train_step, eval_step, train_batches, run_dir,
               options: TrainerOptions, val_batches: Callable[[], Iterable[dict]] | None = None,
               validator: Callable[[], dict] | None = None,
               mesh=None, rules=pmesh.DEFAULT_RULES, wandb_project: str | None = None,
               config: dict | None = None, graphdef=None, reference=None, companion=None,
               on_start: Callable[[int], None] | None = None):
    """With ``mesh``, the state is sharded by ``rules`` and every batch is this process's rows.

    ``reference(batch, state) -> dict``, when given, adds fields to every (device) batch before the
    train and eval steps see it: the reference policy's log-probs of DPO, for example
    (``ReferencePass``).
    ``companion``: a second trained model with checkpoints of its own (PPO's critic), which has
    ``save(step, metrics)``, ``restore(step)`` and ``wait()``; it is saved and restored at the same
    steps as this state.
    ``on_start(step)``: called once training starts at ``step`` (0, or the checkpoint it resumed from),
    such as to record the run's config.
    """
    self.companion, self.on_start = companion, on_start
    self.graphdef = graphdef
    self.reference = reference
    self.mesh, self.rules = mesh, rules
    self.state_sharding = None
    if mesh is not None:
      self.state_sharding = pmesh.tree_shardings(state, mesh, rules)
      state = pmesh.place(state, self.state_sharding)
    self.state = state
    self.options = options
    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.train_batches = train_batches
    self.val_batches = val_batches
    self.validator = validator  # replaces the loss over val_batches (e.g. the reward of generated replies)
    self._train_fn, self._eval_fn = train_step, eval_step
    self._train_step = self._eval_step = None
    self.checkpoints = checkpoint_manager(self.run_dir / "checkpoints", options)
    self.metrics = MetricsWriter(self.run_dir, wandb_project, config)  # started by run(), after the restore
    self._stop_signal = None
    self._writing: int | None = None  # the step of the checkpoint being written in the background
    self.losses: dict[int, float] = {}
    self.last_val: dict | None = None

  def _put(self, batch):
    batch = batch if self.mesh is None else pmesh.put_batch(batch, self.mesh, self.rules)
    if self.reference is not None:
      batch = {**batch, **self.reference(batch, self.state)}
    return batch

  def _jit(self, batch):
    """Jit the steps on the first batch, with explicit shardings when there is a mesh."""
    if self._train_step is None:
      batch_sh = pmesh.batch_shardings(batch, self.mesh, self.rules) if self.mesh is not None else None
      self._train_step = jit_train_step(self._train_fn, self.state_sharding, batch_sh)
      eval_kwargs = dict(in_shardings=(self.state_sharding, batch_sh)) if self.mesh is not None else {}
      self._eval_step = jax.jit(self._eval_fn, **eval_kwargs)

  def lower_train_step(self, batch):
    """The train step lowered for ``batch`` (a device batch), as the loop compiles it."""
    self._jit(batch)
    return self._train_step.lower(self.state, batch)

  def optimizer_in_host_memory(self, enabled: bool = True):
    """The optimizer state waits in pinned host memory (NeMo's offload of the Adam states) while the
    block runs, such as a rollout's generation and scoring, and is back on the devices after it."""
    return optimizer_in_host_memory(self, enabled)

  def model(self):
    """The model with the current parameters (needs the ``graphdef`` the trainer was given)."""
    if self.graphdef is None:
      raise ValueError("this Trainer was built without a graphdef")
    return nnx.merge(self.graphdef, self.state.params, self.state.rest, copy=True)

  # -- checkpoints ------------------------------------------------------------------------------

  # Checkpoints hold what training changes: trained parameters, optimizer, step, RNG, data position.
  # ``rest`` (frozen weights such as a LoRA base model) and the schedule are rebuilt from the config,
  # never saved: a resume with more steps follows the schedule of its config.

  def _save(self, step: int, metrics: dict | None = None):
    data_state = self.train_batches.get_state() if hasattr(self.train_batches, "get_state") else {}
    saved = checkpointed(self.state)
    self._check_saves(wait=True)  # the one before: a failed write stops the run before another begins
    try:
      self.checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                                           data=ocp.args.JsonSave(data_state)),
                            metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 - whatever the write raised, the message names it
      raise TrainingError(self._save_failure(step, e)) from None
    self._writing = step
    if self.companion is not None:
      self.companion.save(step, metrics)

  def _check_saves(self, wait: bool = False):
    """Raises a ``TrainingError`` naming the checkpoint whose asynchronous write failed, once the write
    has ended (``wait``: waiting for it to end)."""
    if self._writing is None or (not wait and self.checkpoints.is_saving_in_progress()):
      return
    step, self._writing = self._writing, None
    try:
      self.checkpoints.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise TrainingError(self._save_failure(step, e)) from None

  def _save_failure(self, step: int, error: BaseException) -> str:
    complete = [s for s in checkpoint_steps(self.run_dir / "checkpoints") if s != step]
    return (f"checkpoint {step} could not be written to {self.run_dir / 'checkpoints' / str(step)}: "
            f"{failure_reason(error)}; the last complete checkpoint is {complete[-1] if complete else 'none'}")

  def restore(self) -> int | None:
    """Restores the newest checkpoint, returning its step (None: there is none). One that cannot be read
    stops the resume with its name and the newest intact one, or with ``skip_unreadable_checkpoints``
    is set aside (renamed ``<step>.unreadable``, never deleted) and the intact one is taken."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpointed(self.state))
    step, restored, unreadable = restore_newest_readable(self.checkpoints, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    if unreadable:
      self._set_aside(unreadable, step)
    if step is None:
      return None
    self.state = restored_state(restored.state, self.state)
    if self.companion is not None:
      self.companion.restore(step)
    if restored.data and hasattr(self.train_batches, "set_state"):
      self.train_batches.set_state(restored.data)
    return step

  def _set_aside(self, unreadable: list, intact: int | None):
    folder = self.run_dir / "checkpoints"
    named = ", ".join(f"checkpoint {s} ({why})" for s, why in unreadable)
    if not self.options.skip_unreadable_checkpoints or intact is None:
      offer = (f"checkpoint {intact} is intact: set train.skip_unreadable_checkpoints=True to resume from it"
               if intact is not None else "no checkpoint there can be read")
      raise TrainingError(f"{folder}: {named} cannot be read; {offer}")
    if jax.process_index() == 0:
      for s, _ in unreadable:
        (folder / str(s)).rename(folder / f"{s}.unreadable")
      print(f"warning: {named} cannot be read (kept as <step>.unreadable); resuming from checkpoint {intact}",
            file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jalign: unreadable checkpoints set aside")
    self.checkpoints.reload()

  # -- validation -------------------------------------------------------------------------------

  def validate(self) -> dict:
    if self.validator is not None:
      return self.validator()
    total = weight = 0.0
    sums: dict[str, float] = {}
    for batch in self.val_batches():
      batch = self._put(batch)
      self._jit(batch)
      t, w, s = self._eval_step(self.state, batch)
      total += float(t)
      weight += float(w)
      for k, v in s.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(weight, 1e-9)
    return {"val_loss": total / weight, **{f"val_{k}": v / weight for k, v in sums.items()}}

  # -- the loop ---------------------------------------------------------------------------------

  def _unsound(self, step: int, metrics: dict, state_step: int) -> str:
    """The stop message of a non-finite metric measured on the state of ``state_step``. A checkpoint is
    good when the loss, gradient norm and validation metrics of the state it holds were finite: those
    older than ``state_step`` (a later one, on the way to it, was not measured)."""
    bad = ", ".join(f"{k} is {metrics[k]}" for k in sorted(metrics, key=lambda k: k != "loss")
                    if not math.isfinite(metrics[k]))
    self._check_saves(wait=True)
    good = [s for s in self.checkpoints.all_steps() if s < state_step]
    return (f"step {step}: {bad}; stopping. The last good checkpoint is "
            f"{f'step {max(good)}' if good else 'none'} in {self.run_dir / 'checkpoints'}")

  def _on_signal(self, signum, frame):
    if self._stop_signal:  # a second one: whatever the step waits on (a hung server, say), stop now
      raise _SecondSignal()
    self._stop_signal = signum

  def run(self) -> dict:
    with pmesh.use(self.mesh, self.rules):
      return self._run()

  def _run(self) -> dict:
    o = self.options
    start_step = (self.restore() if o.resume else None) or 0
    if self.on_start is not None:
      self.on_start(start_step)
    self.metrics.start(resumed_from=start_step)
    progress = Progress(o.max_steps, start_step, o.log_every)
    if start_step:
      progress.log(f"resumed from step {start_step} ({self.run_dir / 'checkpoints'})")
    previous = signal.signal(signal.SIGTERM, self._on_signal)
    began = time.monotonic()
    reason = "finished"
    step = start_step
    peak = metrics_lib.peak_flops()
    try:
      while step < o.max_steps:
        self._check_saves()
        batch = next(self.train_batches)
        t0 = time.perf_counter()
        device_batch = self._put(batch)
        self._jit(device_batch)
        self.state, metrics = self._train_step(self.state, device_batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step_time = time.perf_counter() - t0
        step += 1
        if not _all_finite(metrics, ("loss", "grad_norm")):  # measured on the state of step - 1
          raise TrainingError(self._unsound(step, metrics, state_step=step - 1))
        all_tokens = _count(batch, "segment_ids") * jax.process_count()
        metrics.update(step_time=step_time, tokens_per_s=all_tokens / step_time)
        if o.flops_per_token and peak:
          metrics["mfu"] = o.flops_per_token * all_tokens / step_time / (peak * jax.device_count())
        metrics["target_tokens"] = metrics.pop("weight")
        self.losses[step] = metrics["loss"]
        self.metrics.write(step, metrics)
        progress.update(step, metrics)

        val = None
        if o.val_check_interval and (self.val_batches or self.validator) and (step % o.val_check_interval == 0 or step == o.max_steps):
          val = self.validate()
          if not _all_finite(val, val):  # this step's state: it is not saved
            raise TrainingError(self._unsound(step, val, state_step=step))
          self.last_val = val
          self.metrics.write(step, val, prefix="val")
          progress.log(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))
        timed_out = o.max_time_s and time.monotonic() - began > o.max_time_s
        if (o.save_interval and step % o.save_interval == 0) or step == o.max_steps or timed_out or self._stop_signal:
          self._save(step, {o.monitor: val[o.monitor]} if val and o.monitor in val else None)
        if self._stop_signal or timed_out:
          reason = "SIGTERM" if self._stop_signal else "time limit"
          break
    except _SecondSignal:
      self._check_saves(wait=True)
      last = self.checkpoints.latest_step()
      raise TrainingError(f"a second SIGTERM stopped step {step + 1} midway; the last checkpoint is "
                          f"{f'step {last}' if last else 'none'} in {self.run_dir / 'checkpoints'}") from None
    finally:
      signal.signal(signal.SIGTERM, previous)
      try:
        self._check_saves(wait=True)
      finally:
        if self.companion is not None:
          self.companion.wait()
        progress.close()
        failing = sys.exc_info()[0] is not None
        try:
          self.metrics.close()
        except metrics_lib.MetricsError:
          if not failing:  # else the run's own error says what went wrong (a full disk fails both)
            raise
    return {"steps": step, "stopped": reason, "run_dir": str(self.run_dir),
            "last_checkpoint": self.checkpoints.latest_step(), "val": self.last_val}


@contextlib.contextmanager
def optimizer_in_host_memory(holder, enabled: bool = True):
  """Within the block, ``holder.state.opt_state`` (of a ``Trainer`` or PPO's critic, which hold a placed
  ``TrainState`` and its ``state_sharding``) waits in pinned host memory; it is back on the devices,
  laid out as before, after it. Not ``enabled``, or without shardings (no mesh), nothing moves."""
  if not enabled or holder.state_sharding is None:
    yield
    return
  on_devices = holder.state_sharding.opt_state
  in_host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), on_devices)
  holder.state = holder.state.replace(opt_state=jax.device_put(holder.state.opt_state, in_host))
  try:
    yield
  finally:
    holder.state = holder.state.replace(opt_state=jax.device_put(holder.state.opt_state, on_devices))


def _all_finite(metrics: dict, keys) -> bool:
  return all(math.isfinite(metrics[k]) for k in keys if k in metrics)


def count(tree) -> int:
  """Number of array elements in a pytree (parameters, for instance)."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _count(batch, name: str) -> float:
  """Non-zero entries of every ``name`` array in a (possibly nested) batch: real or target tokens."""
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  return float(sum(np.count_nonzero(np.asarray(v)) for path, v in leaves
                   if getattr(path[-1], "key", None) == name))
