"""Optimizer and learning-rate schedule with NeMo-Aligner's defaults.

AdamW (betas 0.9/0.98, eps 1e-8), no weight decay on norm scales and biases, gradients clipped to a
global norm of 1.0, and NeMo's ``CosineAnnealing``: linear warmup to ``lr``, cosine decay to
``min_lr``, then ``constant_steps`` at ``min_lr`` until ``max_steps``.

The schedule is numbers, not code: a ``NemoSchedule`` of scalar arrays that a train step receives in its
state and hands to the optimizer's update (``schedule=``). Runs that differ only in their rates or lengths
(a resume with more steps, a sweep of learning rates) then run one compiled step, where a schedule closed
over by the step would be baked into each program as constants.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class NemoSchedule:
  """NeMo's ``CosineAnnealing`` as float32 scalars; ``schedule(step)`` is the rate at optimizer step ``step``,
  computed as optax's warmup, cosine decay and constant schedules joined compute it, operation for
  operation (``alpha``: ``min_lr / lr`` and ``1 - alpha`` rounded from float64, as optax takes them)."""
  lr: jax.Array
  min_lr: jax.Array
  warmup_steps: jax.Array
  decay_steps: jax.Array
  alpha: jax.Array
  one_minus_alpha: jax.Array

  def __call__(self, step) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.maximum(self.warmup_steps, 1.0)
    warming = -self.lr * (1 - jnp.clip(step, 0.0, warmup) / warmup) + self.lr
    rate = jnp.where(self.warmup_steps > 0, warming, self.lr)
    decayed = jnp.minimum(step - self.warmup_steps, self.decay_steps)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * decayed / self.decay_steps))
    rate = jnp.where(step < self.warmup_steps, rate, self.lr * (self.one_minus_alpha * cosine + self.alpha))
    return jnp.where(step < self.warmup_steps + self.decay_steps, rate, self.min_lr)


def nemo_schedule(lr: float, *, max_steps: int, warmup_steps: int = 10, constant_steps: int = 0,
                  min_lr: float | None = None) -> NemoSchedule:
  """The schedule NeMo's ``CosineAnnealing`` takes these arguments for; ``min_lr`` defaults to ``lr / 10``."""
  min_lr = lr / 10 if min_lr is None else min_lr
  alpha = min_lr / lr if lr > 0 else 0.0
  scalar = lambda x: jnp.asarray(x, jnp.float32)
  return NemoSchedule(lr=scalar(lr), min_lr=scalar(min_lr), warmup_steps=scalar(warmup_steps),
                      decay_steps=scalar(max(1, max_steps - warmup_steps - constant_steps)), alpha=scalar(alpha),
                      one_minus_alpha=scalar(1 - alpha))


def constant_schedule(lr: float) -> NemoSchedule:
  """One rate throughout."""
  return nemo_schedule(lr, max_steps=1, warmup_steps=0, min_lr=lr)


def scale_by_schedule_argument() -> optax.GradientTransformationExtraArgs:
  """Scales updates by minus the rate of the ``schedule=`` its update is given, at its own step count
  (the state of ``optax.scale_by_schedule``, so that checkpoints of either read alike)."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, schedule: NemoSchedule):
    del params
    lr = schedule(state.count)
    updates = jax.tree.map(lambda g: (-lr).astype(g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def _decays(path, _) -> bool:
  name = str(getattr(path[-1], "key", path[-1]))
  return not (name == "scale" or name.endswith("bias"))


def adamw(*, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8, weight_decay: float = 0.01,
          grad_clip: float | None = 1.0) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` (decoupled weight decay, scaled by the rate) clipped first, whose rate comes from the
  ``schedule=`` (a ``NemoSchedule``) each update is given: ``tx.update(grads, state, params, schedule=s)``."""
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                           optax.add_decayed_weights(weight_decay, decay_mask),
                           scale_by_schedule_argument()))
  return optax.chain(*parts)
