"""Pipeline parallelism on GSPMD: stages vmapped over a ``pipeline`` mesh axis, micro-batches rotated.

The schedule is kept apart from what a stage computes. ``gpipe(stage_fn, stage_params, xs, aux)``
runs ``num_micro`` micro-batches through ``S`` stages in ``num_micro + S - 1`` iterations. At every
iteration all stages run at once (``jax.vmap`` over the leading stage axis, which the rules shard
over ``pipeline``): stage 0 takes the next micro-batch, stage s takes what stage s-1 produced in the
previous iteration (a ``jnp.roll`` over the sharded stage axis, which XLA turns into a collective
permute), and the last stage's output is collected. Iterations where a stage has no micro-batch
(the bubble, ``(S-1)/(M+S-1)`` of the time) compute on zeros and are discarded. Autodiff through
the loop gives the backward schedule.

``circular`` is the interleaved schedule: each device holds ``repeats`` non-adjacent groups of
layers and every micro-batch goes round the ring ``repeats`` times, which shrinks the bubble to
``(S-1)/(M*R+S-1)`` for the same memory (``M >= S``; fewer micro-batches are padded to ``S``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _stage_inputs(xs, i, num_stages):
  """The micro-batch index each stage works on at iteration ``i`` (clamped) and whether it is real."""
  j = i - jnp.arange(num_stages)
  return jnp.clip(j, 0, xs.shape[0] - 1), (j >= 0) & (j < xs.shape[0])


def gpipe(stage_fn: Callable, stage_params, xs: jax.Array, aux=None, *, spmd_axis_name: str | None = None):
  """``ys[m] = stage_{S-1}(... stage_0(xs[m]))`` for micro-batches ``xs`` ``[M, ...]``.

  ``stage_params`` has a leading stage axis ``S``; ``stage_fn(params_s, x, aux_m) -> y`` with ``y`` the
  shape of ``x``; ``aux`` ``[M, ...]`` (e.g. positions) follows its micro-batch through the stages.
  """
  num_stages = jax.tree.leaves(stage_params)[0].shape[0]
  num_micro = xs.shape[0]
  run = jax.vmap(stage_fn, spmd_axis_name=spmd_axis_name)

  def step(carry, i):
    state, outputs = carry
    shifted = jnp.roll(state, 1, axis=0)  # stage s gets stage s-1's last output
    first = xs[jnp.minimum(i, num_micro - 1)]
    inputs = shifted.at[0].set(first)
    index, _ = _stage_inputs(xs, i, num_stages)
    stage_aux = None if aux is None else jax.tree.map(lambda a: a[index], aux)
    out = run(stage_params, inputs, stage_aux)
    done = i - (num_stages - 1)  # the micro-batch the last stage just finished
    last = jnp.where(done >= 0, out[-1], outputs[jnp.maximum(done, 0)])
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, last, jnp.maximum(done, 0), 0)
    return (out, outputs), None

  state = jnp.zeros((num_stages, *xs.shape[1:]), xs.dtype)
  outputs = jnp.zeros_like(xs)
  (_, outputs), _ = jax.lax.scan(step, (state, outputs), jnp.arange(num_micro + num_stages - 1))
  return outputs


def circular(stage_fn: Callable, stage_params, xs: jax.Array, aux=None, *, repeats: int,
             spmd_axis_name: str | None = None):
  """The interleaved schedule. ``stage_params`` ``[R, S, ...]``: group ``r*S + s`` runs on stage ``s``.

  A micro-batch visits stage 0..S-1 ``R`` times, running group ``r*S + s`` on its r-th visit. A
  micro-batch is back at stage 0 ``S`` iterations after it left, so with ``M < S`` micro-batches the
  schedule runs ``S - M`` bubble micro-batches of zeros beside them (computed and discarded: no
  value or gradient comes from them), the bubble the ring needs anyway.
  """
  num_repeats, num_stages = jax.tree.leaves(stage_params)[0].shape[:2]
  if num_repeats != repeats:
    raise ValueError(f"stage_params have {num_repeats} repeats, expected {repeats}")
  real = xs.shape[0]
  if real < num_stages:
    pad = lambda a: jnp.concatenate([a, jnp.zeros((num_stages - real, *a.shape[1:]), a.dtype)])
    xs = pad(xs)
    aux = None if aux is None else jax.tree.map(pad, aux)
  num_micro = xs.shape[0]
  run = jax.vmap(stage_fn, spmd_axis_name=spmd_axis_name)
  total = num_micro * repeats + num_stages - 1

  def step(carry, i):
    state, outputs = carry
    shifted = jnp.roll(state, 1, axis=0)
    # Stage s at iteration i handles work item k = i - s; item k is micro-batch k % M on visit k // M.
    k = i - jnp.arange(num_stages)
    micro = jnp.clip(k, 0, num_micro * repeats - 1) % num_micro
    visit = jnp.clip(k, 0, num_micro * repeats - 1) // num_micro
    # Stage 0 starts a micro-batch's first visit from the data; a later visit continues from what
    # stage S-1 produced on the previous one, kept in ``outputs`` (with M >= S it is written before
    # it is needed and not overwritten until after).
    again = outputs[micro[0]]
    inputs = shifted.at[0].set(jnp.where(visit[0] == 0, xs[micro[0]], again))
    params = jax.tree.map(lambda p: p[visit, jnp.arange(num_stages)], stage_params)
    stage_aux = None if aux is None else jax.tree.map(lambda a: a[micro], aux)
    out = run(params, inputs, stage_aux)
    done = i - (num_stages - 1)
    valid = (done >= 0) & (done < num_micro * repeats)
    slot = jnp.clip(done, 0, num_micro * repeats - 1) % num_micro
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, jnp.where(valid, out[-1], outputs[slot]), slot, 0)
    return (out, outputs), None

  state = jnp.zeros((num_stages, *xs.shape[1:]), xs.dtype)
  (_, outputs), _ = jax.lax.scan(step, (state, jnp.zeros_like(xs)), jnp.arange(total))
  return outputs[:real]
