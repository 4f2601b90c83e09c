"""Reward-model losses and read-out helpers (NeMo-Aligner ``MegatronGPT(Regression)RewardModel``).

A reward model is the policy trunk with a ``[H, A]`` head. Its scalar score is the head applied to the
hidden state of the last real token (``gather_last``) or, with ``use_avg_pool``, to the mean over the
real tokens (``mean_pool``); ``merge_attributes`` folds A attribute scores into one reward and
``standardize`` applies the optional inference-time ``(r - mean) / std``.

Losses (every ``*loss`` returns ``(loss, metrics)`` with jnp scalar metrics):

- ``bt_loss``: pairwise Bradley-Terry, mean over pairs. ``kind="regular"`` is ``-log sigma(r_c - r_r)``
  (NeMo's ``binary_ranking`` RM and the ``regular_bt`` regression-head loss); ``"margin"`` is
  ``-log sigma(r_c - r_r - |s|)`` and ``"scaled"`` is ``|s| * -log sigma(r_c - r_r)`` with ``s`` the
  per-pair preference strength (HelpSteer2-Preference ``label[0]`` in -3..3; only its magnitude counts,
  the caller has already put the preferred response in ``r_chosen``).
- ``regression_loss``: squared error over the labelled attributes, summed and divided by the number of
  labelled entries (entries equal to ``mask_value``, NeMo's ``loss_mask_val`` -100, are ignored).

The losses are plain means over the arrays they get (NeMo normalises per micro-batch); a trainer that
splits a batch into micro-batches averages the per-micro-batch losses, as NeMo does.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.nn import log_sigmoid

BT_KINDS = ("regular", "margin", "scaled")
_BT_ALIASES = {"regular_bt": "regular", "margin_bt": "margin", "scaled_bt": "scaled"}


def _float(x):
  """``x`` as a jnp array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def bt_loss(r_chosen, r_rejected, *, kind="regular", strength=None, weights=None):
  """Bradley-Terry loss over ``[B]`` pairs of scalar rewards; returns ``(loss, metrics)``.

  ``kind`` in ``BT_KINDS`` (NeMo's ``regular_bt``/``margin_bt``/``scaled_bt`` spellings are accepted
  too). ``"margin"`` and ``"scaled"`` need ``strength`` ``[B]``; ``"regular"`` ignores it.
  Metrics: ``accuracy`` = mean(r_c > r_r), ``rewards_chosen_mean``, ``rewards_rejected_mean``,
  ``rewards_all_mean``, ``rewards_all_std`` (uncorrected, over chosen and rejected together).
  ``weights`` ``[B]`` (default all 1) weight the pairs in the loss and the metrics; 0 marks padding.
  """
  kind = _BT_ALIASES.get(kind, kind)
  if kind not in BT_KINDS:
    raise ValueError(f"bt_loss kind {kind!r} is not one of {BT_KINDS}")
  r_c, r_r = _float(r_chosen), _float(r_rejected)
  if r_c.shape != r_r.shape:
    raise ValueError(f"r_chosen {r_c.shape} and r_rejected {r_r.shape} must have the same shape")
  delta = r_c - r_r
  if kind == "regular":
    per_pair = -log_sigmoid(delta)
  else:
    if strength is None:
      raise ValueError(f"bt_loss kind {kind!r} needs the per-pair preference `strength` [B]")
    s = jnp.abs(_float(strength))
    if s.shape != delta.shape:
      raise ValueError(f"strength {s.shape} must match the rewards {delta.shape}")
    per_pair = -log_sigmoid(delta - s) if kind == "margin" else s * -log_sigmoid(delta)
  w = jnp.ones_like(per_pair) if weights is None else _float(weights).astype(per_pair.dtype)
  if w.shape != per_pair.shape:
    raise ValueError(f"weights {w.shape} must match the pairs {per_pair.shape}")
  mean = lambda x: jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-9)
  loss = mean(per_pair)
  all_mean = (mean(r_c) + mean(r_r)) / 2
  metrics = {
      "accuracy": mean((r_c > r_r).astype(loss.dtype)),
      "rewards_chosen_mean": mean(r_c),
      "rewards_rejected_mean": mean(r_r),
      "rewards_all_mean": all_mean,
      "rewards_all_std": jnp.sqrt(jnp.maximum((mean(r_c ** 2) + mean(r_r ** 2)) / 2 - all_mean ** 2, 0.0)),
  }
  return loss, metrics


def regression_loss(pred, labels, *, mask_value=-100.0):
  """Masked MSE of ``pred`` against ``labels`` (both ``[B, A]``); returns ``(loss, metrics)``.

  loss = sum over entries with ``labels != mask_value`` of ``(pred - label)^2`` / number of such
  entries. With no labelled entry at all the loss is 0 (NeMo divides by zero and gets NaN).
  Metrics: ``num_labelled`` and ``abs_error_mean`` over the labelled entries.
  """
  pred, labels = _float(pred), _float(labels)
  if pred.shape != labels.shape:
    raise ValueError(f"pred {pred.shape} and labels {labels.shape} must have the same shape")
  mask = (labels != mask_value).astype(pred.dtype)
  count = jnp.sum(mask)
  denom = jnp.maximum(count, 1.0)
  diff = jnp.where(mask > 0, pred - labels, 0.0)
  loss = jnp.sum(diff * diff) / denom
  metrics = {"num_labelled": count, "abs_error_mean": jnp.sum(jnp.abs(diff)) / denom}
  return loss, metrics


def last_token_index(mask):
  """Index ``[B]`` of the last nonzero entry of each row of ``mask [B, T]`` (0 for an empty row).

  For right-padded rows this is ``lengths - 1``; it also handles left padding and holes.
  """
  mask = jnp.asarray(mask) != 0
  t = mask.shape[-1]
  positions = jnp.arange(t, dtype=jnp.int32)
  return jnp.max(jnp.where(mask, positions, 0), axis=-1)


def gather_last(hidden, lengths):
  """``hidden[b, lengths[b] - 1]`` for ``hidden [B, T, ...]`` and ``lengths [B]`` -> ``[B, ...]``.

  This is NeMo's reward read-out position (the last real token). ``lengths`` of 0 read position 0.
  """
  hidden = jnp.asarray(hidden)
  idx = jnp.clip(jnp.asarray(lengths).astype(jnp.int32) - 1, 0, hidden.shape[1] - 1)
  idx = idx.reshape((-1, 1) + (1,) * (hidden.ndim - 2))
  return jnp.take_along_axis(hidden, idx, axis=1)[:, 0]


def mean_pool(hidden, lengths):
  """Mean of ``hidden [B, T, ...]`` over positions ``[0, lengths[b])`` (NeMo's ``use_avg_pool``)."""
  hidden = jnp.asarray(hidden)
  lengths = jnp.asarray(lengths)
  keep = jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]
  keep = keep.reshape(keep.shape + (1,) * (hidden.ndim - 2)).astype(hidden.dtype)
  total = jnp.sum(hidden * keep, axis=1)
  return total / jnp.maximum(lengths, 1).reshape((-1,) + (1,) * (hidden.ndim - 2)).astype(total.dtype)


def merge_attributes(rewards, weights=None):
  """Fold ``rewards [..., A]`` into ``[...]`` by ``weights [A]`` (default uniform 1/A, as NeMo)."""
  rewards = jnp.asarray(rewards)
  a = rewards.shape[-1]
  w = jnp.full((a,), 1.0 / a, rewards.dtype) if weights is None else jnp.asarray(weights, rewards.dtype)
  if w.shape != (a,):
    raise ValueError(f"attribute weights {w.shape} must be ({a},)")
  return rewards @ w


def standardize(rewards, mean, std):
  """Inference-time reward standardisation ``(r - mean) / std`` (NeMo ``reward_standardization``)."""
  if isinstance(std, (int, float)) and not std > 0:
    raise ValueError(f"reward standardisation std must be > 0, got {std}")
  return (jnp.asarray(rewards) - mean) / std


# ----------------------------------------------------------------------------------------------
# On a model: the pieces the shared training loop calls
# ----------------------------------------------------------------------------------------------


def segment_last_index(segment_ids, num_segments: int):
  """``[R, S]`` position of the last token of segments 1..S in each row (0 for an absent segment)."""
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)[None, :, None]
  return jnp.max(jnp.where(onehot, positions, 0), axis=1)


def pair_rewards(model, batch):
  """``(chosen [N], rejected [N])`` scalar rewards (attributes merged) of the pair slots of rows laid
  out by ``data.preference.pairs_row``, read at each response's last token; one forward pass."""
  values = model(batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
  slots = batch["pair_mask"].shape[-1]
  last = segment_last_index(batch["segment_ids"], 2 * slots)
  rewards = merge_attributes(jnp.take_along_axis(values, last[..., None], axis=1))  # [R, 2 slots]
  return rewards[:, 0::2].reshape(-1), rewards[:, 1::2].reshape(-1)


def train_loss(model, batch, rng=None, *, kind="regular"):
  """``(loss_sum, pairs, metric_sums)`` of a micro-batch of pairs, for ``trainer.make_train_step``.

  ``"margin"`` / ``"scaled"`` read the per-pair strength from ``chosen_reward - rejected_reward``.
  Padding pairs (no tokens) weigh nothing.
  """
  del rng
  r_chosen, r_rejected = pair_rewards(model, batch)
  real = batch["pair_mask"].reshape(-1)
  strength = None if kind == "regular" else (batch["chosen_reward"] - batch["rejected_reward"]).reshape(-1)
  value, metrics = bt_loss(r_chosen, r_rejected, kind=kind, strength=strength, weights=real)
  pairs = jnp.sum(real)
  return value * pairs, pairs, {k: v * pairs for k, v in metrics.items()}


def regression_train_loss(model, batch, rng=None, *, mask_value=-100.0):
  """``(squared_error_sum, labelled_entries, metric_sums)`` of a micro-batch of regression rows
  (``data.prompts.regression_rows``: one text per row, ``length`` and ``label [A]``), the prediction
  read at each text's last token. The step's loss is then NeMo's sum over labelled attributes of the
  squared error divided by their number, over the whole global batch."""
  del rng
  values = model(batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
  pred = gather_last(values, batch["length"])
  value, metrics = regression_loss(pred, batch["label"], mask_value=mask_value)
  count = metrics["num_labelled"]
  return value * count, count, {"abs_error": metrics["abs_error_mean"] * count}
