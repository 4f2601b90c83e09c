"""Optimizer and learning-rate schedule with NeMo-Aligner's defaults.

AdamW (betas 0.9/0.98, eps 1e-8), no weight decay on norm scales and biases, gradients clipped to a
global norm of 1.0, and NeMo's ``CosineAnnealing``: linear warmup to ``lr``, cosine decay to
``min_lr``, then ``constant_steps`` at ``min_lr`` until ``max_steps``.
"""

from __future__ import annotations

import jax
import optax


def nemo_schedule(lr: float, *, max_steps: int, warmup_steps: int = 10, constant_steps: int = 0,
                  min_lr: float | None = None) -> optax.Schedule:
  min_lr = lr / 10 if min_lr is None else min_lr
  decay_steps = max(1, max_steps - warmup_steps - constant_steps)
  alpha = min_lr / lr if lr > 0 else 0.0
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr),
       optax.cosine_decay_schedule(lr, decay_steps, alpha=alpha),
       optax.constant_schedule(min_lr)],
      boundaries=[warmup_steps, warmup_steps + decay_steps])


def _decays(path, _) -> bool:
  name = str(getattr(path[-1], "key", path[-1]))
  return not (name == "scale" or name.endswith("bias"))


def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8,
          weight_decay: float = 0.01, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)
